"""MarkerMNIST: a small class-specific glyph in the digit's margin is the spurious cue.

A local, luminance-only artefact, like a ruler or a watermark in medical and web images: each
grey digit gets one 5x5 glyph (plus, ring, triangle, bar, cross, square, diamond, corner,
dots, tee: :data:`cdistill.concepts.glyphs.GLYPH_NAMES`) at a random position outside the digit's
bounding box where there is room (else over no ink, else over the least ink). The glyphs are
drawn by :mod:`cdistill.concepts.glyphs`, the same code that draws the concept sets
(``concepts/marker_mnist.yaml``, ``kind: glyph``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from cdistill.concepts.glyphs import GLYPH_NAMES, GLYPH_SIZE, draw_glyphs
from cdistill.errors import CdistillError
from datamodules.biased_mnist import BiasedMNISTDataModule, Rendered


class MarkerMNISTDataModule(BiasedMNISTDataModule):
    """Grey digits (1 channel) with a class-specific glyph in the margin.

    * ``train``, ``val``: glyph ``y`` (100% correlation); with ``unbiased`` the ``train``
      glyph is uniformly random (the oracle).
    * ``val_reversed``, ``test``: glyph ``9 - y`` (reversed, as ColorMNIST and DecoyMNIST).
    * ``test_random_glyph``: a uniformly random glyph per image.

    ``bias`` is the glyph id (glyph k points to class k); ``cue`` is the glyph's top-left
    corner as ``row * 28 + col``. Positions are drawn per image in every split.

    Args:
        glyph_level: Grey level of the glyph's pixels, 1..255 (digits peak at 255).
        glyph_size: Side of the glyph in pixels (the 5x5 designs enlarged by nearest
            neighbour), 5..12.
        glyph_copies: Glyphs per image, each placed away from the ink already drawn.
        **kwargs: :class:`BiasedMNISTDataModule` arguments.
    """

    name: str = "marker_mnist"
    num_channels: ClassVar[int] = 1
    random_cue_split: ClassVar[str | None] = "test_random_glyph"
    extra_test_names: ClassVar[tuple[str, ...]] = ("test_random_glyph",)

    def __init__(
        self, glyph_level: int = 255, glyph_size: int = GLYPH_SIZE, glyph_copies: int = 24, **kwargs: Any
    ) -> None:
        if not 1 <= int(glyph_level) <= 255:
            raise CdistillError(f"data.glyph_level={glyph_level} must be in 1..255.")
        if not GLYPH_SIZE <= int(glyph_size) <= 12:
            raise CdistillError(f"data.glyph_size={glyph_size} must be in {GLYPH_SIZE}..12.")
        if not 1 <= int(glyph_copies) <= 64:
            raise CdistillError(f"data.glyph_copies={glyph_copies} must be in 1..64.")
        super().__init__(**kwargs)
        self.save_hyperparameters()
        self.glyph_copies = int(glyph_copies)
        self.glyph_level = int(glyph_level)
        self.glyph_size = int(glyph_size)

    def render(
        self, split: str, digits: Tensor, labels: Tensor, generator: torch.Generator
    ) -> Rendered:
        """See :meth:`BiasedMNISTDataModule.render`; returns ``uint8 [N, 1, 28, 28]``."""
        glyph = self.split_cue(split, labels, shifted=lambda: 9 - labels, extra={
            "test_random_glyph": lambda: torch.randint(0, len(GLYPH_NAMES), labels.shape, generator=generator),
        })
        images, corner = draw_glyphs(
            digits, glyph, generator, self.glyph_level, self.glyph_size, self.glyph_copies
        )
        first = corner[:, 0]  # the first copy's corner (it always misses the digit's ink)
        return Rendered(images.unsqueeze(1), glyph, first[:, 0] * self.image_size + first[:, 1])
