"""Concept sets (specs, folders, synthetic generators), CAV solvers and banks, and TCAV.

``cdistill.concepts`` was one module before the subpackages; its public names are re-exported
here so that ``from cdistill.concepts import load_spec`` keeps working.
"""

from cdistill.concepts.sets import (
    IMAGE_SUFFIXES,
    PROJECT_ROOT,
    blob_masks,
    expand_templates,
    generate,
    load_image_folder,
    load_spec,
    preprocess,
    stroke_masks,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "PROJECT_ROOT",
    "blob_masks",
    "expand_templates",
    "generate",
    "load_image_folder",
    "load_spec",
    "preprocess",
    "stroke_masks",
]
