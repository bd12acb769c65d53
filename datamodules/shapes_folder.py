"""A generated biased dataset in the layout of the README's "Use your own data" (``data=folder``).

    python -m datamodules.shapes_folder <root> [--num-classes 4] [--n-train 2000] [--twin]

``K`` classes of shapes (square, disc, triangle, plus, diamond, ring: the first ``K``) of random
size and position, drawn in a cue colour on a dark noisy background. The colour is the spurious
cue; ``bias`` in ``metadata.csv`` is the class it points to (colour ``k`` -> class ``k``):

* ``train`` and ``val``: colour ``k`` on class ``k``, except an exact ``conflicting_fraction``
  share whose colour is one of the other ``K - 1``, drawn uniformly;
* ``val_reversed``: colour ``(k + 1) mod K`` on class ``k``;
* ``test``: a colour drawn uniformly at random, independently of the label (the random-cue split).

``unbiased=True`` writes the oracle's data: the same images with the training colour drawn
uniformly at random, independently of the label; every other split is identical (each split and
its cue plan has its own seeded generator). Beside the data: the concept folders
``concepts/bias_{k}`` (shapes of any class in colour ``k``) and ``concepts/random`` (random
colours), the spec ``concepts.yaml``, ``data.yaml`` (the ``data=folder`` settings this folder
needs, which ``benchmarks/compare.py`` passes as ``data.<key>=<value>``) and ``shapes_folder.json``
(the generator's arguments). Everything is a function of the arguments (the same seed writes the
same bytes). :func:`unbiased_twin` names the folder where the oracle's copy goes.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from cdistill.errors import CdistillError

SHAPES = ("square", "disc", "triangle", "plus", "diamond", "ring")
#: The cue colour of each class (RGB); own data tests use the first two.
PALETTE = ((220, 40, 40), (40, 200, 60), (50, 90, 230), (230, 210, 40), (210, 60, 210), (40, 200, 210))
SPLITS = ("train", "val", "val_reversed", "test")
#: Settings file written at the root for :mod:`benchmarks.compare` (``data.<key>=<value>``).
DATA_SETTINGS = "data.yaml"
MARKER = "shapes_folder.json"
#: Background pixels are drawn in ``[0, BACKGROUND)``: dark noise under any cue colour.
BACKGROUND = 40


def unbiased_twin(root: Path) -> Path:
    """Where the oracle's copy of the folder dataset ``root`` lives: the sibling ``<root>_unbiased``."""
    root = Path(root)
    return root.with_name(root.name + "_unbiased")


def shape_mask(kind: int, size: int, centre: tuple[int, int], r: int) -> np.ndarray:
    """``bool [size, size]``: the pixels of shape ``SHAPES[kind]`` of half-width ``r`` at ``centre`` (row, column)."""
    yy, xx = np.mgrid[:size, :size]
    dy, dx = yy - centre[0], xx - centre[1]
    inside = (np.abs(dy) <= r) & (np.abs(dx) <= r)
    name = SHAPES[kind]
    if name == "square":
        return inside
    if name == "disc":
        return dy**2 + dx**2 <= r * r
    if name == "triangle":  # apex up: the half-width grows from 0 at the top row to r at the bottom
        return inside & (2 * np.abs(dx) <= dy + r)
    thick = max(1, r // 3)
    if name == "plus":
        return inside & ((np.abs(dy) <= thick) | (np.abs(dx) <= thick))
    if name == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    return (dy**2 + dx**2 <= r * r) & (dy**2 + dx**2 >= (r - thick) ** 2)  # ring


def draw_shape(kind: int, colour: Sequence[int], rng: np.random.Generator, size: int,
               centre: tuple[int, int] | None = None, radius: tuple[int, int] | None = None) -> Image.Image:
    """One RGB image: a filled ``SHAPES[kind]`` in ``colour`` on dark noise.

    Draws from ``rng`` in this order: the background ``[size, size, 3]``, the centre (2 values in
    ``[centre[0], centre[1])``), the half-width (in ``[radius[0], radius[1])``). The default ranges
    keep the whole shape inside the image.

    Args:
        kind: Index into :data:`SHAPES`.
        colour: RGB of the shape.
        rng: The generator to draw from.
        size: Side of the image.
        centre: Half-open range of the centre's row and column; None: ``[size/4, 3 size/4)``.
        radius: Half-open range of the half-width; None: ``[size/6, size/4 + 1)``.
    """
    img = rng.integers(0, BACKGROUND, (size, size, 3)).astype(np.uint8)
    lo, hi = centre or (size // 4, size - size // 4)
    r_lo, r_hi = radius or (max(2, size // 6), size // 4 + 1)
    c, r = rng.integers(lo, hi, 2), int(rng.integers(r_lo, r_hi))
    img[shape_mask(kind, size, (int(c[0]), int(c[1])), r)] = np.asarray(colour, dtype=np.uint8)
    return Image.fromarray(img)


def cue_plan(split: str, n: int, num_classes: int, conflicting_fraction: float, seed: int,
             unbiased: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Labels and cue classes of one split (see the module docstring).

    Returns:
        ``(labels, cues)``, each ``int64 [n]``; labels are class-balanced (``n`` mod ``K`` aside)
        and shuffled.
    """
    k = num_classes
    rng = np.random.default_rng([seed, SPLITS.index(split), 0])
    labels = rng.permutation(np.arange(n) % k)
    if split == "val_reversed":
        return labels, (labels + 1) % k
    if split == "test":
        return labels, rng.integers(0, k, n)
    cues = labels.copy()
    conflicting = rng.choice(n, round(conflicting_fraction * n), replace=False)
    cues[conflicting] = (labels[conflicting] + rng.integers(1, k, conflicting.size)) % k  # another colour, uniformly
    if unbiased and split == "train":  # the oracle: a generator of its own, so labels and images stay the same
        cues = np.random.default_rng([seed, SPLITS.index(split), 1]).integers(0, k, n)
    return labels, cues


def _prepare(root: Path) -> None:
    """Make ``root`` ready to write: new or empty, or written by this generator before (its
    images and concepts are removed, so no stale file survives a smaller rewrite)."""
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise CdistillError(f"{str(root)!r} exists and was not written by datamodules.shapes_folder; give an empty or new folder.")
        for sub in ("images", "concepts"):
            shutil.rmtree(root / sub, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)


def write_shapes_folder(root: Path | str, *, num_classes: int = 4, n_train: int = 2000, n_val: int = 800,
                        n_val_reversed: int = 400, n_test: int = 1200, conflicting_fraction: float = 0.03,
                        image_size: int = 32, concept_images: int = 64, seed: int = 0,
                        unbiased: bool = False) -> Path:
    """Write the dataset under ``root`` (see the module docstring); returns ``root``.

    Args:
        root: New or empty folder (or one this function wrote before: it is rewritten).
        num_classes: ``K`` in ``[2, len(SHAPES)]``.
        n_train: Training images (likewise ``n_val``, ``n_val_reversed``, ``n_test``).
        conflicting_fraction: Exact share of ``train`` and ``val`` whose colour is another class's.
        image_size: Side of every image, concept images included.
        concept_images: Images in each ``concepts/bias_{k}`` and in ``concepts/random`` (5 parts).
        seed: Seeds every draw.
        unbiased: The oracle's data (the training colour independent of the label).

    Raises:
        CdistillError: For settings out of range or a non-empty folder this function did not write.
    """
    root = Path(root)
    if not 2 <= num_classes <= len(SHAPES):
        raise CdistillError(f"num_classes={num_classes}: use 2 to {len(SHAPES)} (one shape per class: {', '.join(SHAPES)}).")
    if not 0.0 <= conflicting_fraction <= 1.0:
        raise CdistillError(f"conflicting_fraction={conflicting_fraction} must be in [0, 1].")
    if image_size < 16:
        raise CdistillError(f"image_size={image_size} is too small for the shapes; use 16 or more.")
    _prepare(root)
    sizes = {"train": n_train, "val": n_val, "val_reversed": n_val_reversed, "test": n_test}
    rows: list[tuple[str, int, int, str]] = []
    for split, n in sizes.items():
        labels, cues = cue_plan(split, n, num_classes, conflicting_fraction, seed, unbiased)
        draw = np.random.default_rng([seed, SPLITS.index(split), 2])  # the same images whatever the cue plan
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        for i, (label, cue) in enumerate(zip(labels.tolist(), cues.tolist(), strict=True)):
            rel = f"images/{split}/{i:05d}.png"
            draw_shape(label, PALETTE[cue], draw, image_size).save(root / rel)
            rows.append((rel, label, cue, split))
    with (root / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "bias", "split"])
        writer.writerows(rows)
    _write_concepts(root, num_classes, image_size, concept_images, seed)
    settings = {"num_classes": num_classes, "image_size": image_size, "channels": 3, "random_cue_split": "test"}
    (root / DATA_SETTINGS).write_text(
        "# data=folder settings of this folder; benchmarks/compare.py passes each as data.<key>=<value>\n"
        + yaml.safe_dump(settings, sort_keys=False))
    args = {"num_classes": num_classes, "n_train": n_train, "n_val": n_val, "n_val_reversed": n_val_reversed,
            "n_test": n_test, "conflicting_fraction": conflicting_fraction, "image_size": image_size,
            "concept_images": concept_images, "seed": seed, "unbiased": unbiased}
    (root / MARKER).write_text(json.dumps(args, indent=1) + "\n")
    return root


def _write_concepts(root: Path, num_classes: int, image_size: int, n: int, seed: int) -> None:
    """``concepts/bias_{k}`` (any shape in colour ``k``), ``concepts/random`` (random colours), ``concepts.yaml``."""
    for k in range(num_classes):
        folder = root / "concepts" / f"bias_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, len(SPLITS), k])
        for j in range(n):
            draw_shape(int(rng.integers(0, num_classes)), PALETTE[k], rng, image_size).save(folder / f"{j:03d}.png")
    folder = root / "concepts" / "random"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, len(SPLITS) + 1])
    for j in range(n):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw_shape(int(rng.integers(0, num_classes)), colour, rng, image_size).save(folder / f"{j:03d}.png")
    (root / "concepts.yaml").write_text(
        f"image_size: {image_size}\nchannels: 3\nsets:\n"
        f'  bias_{{k}}: {{folder: "concepts/bias_{{k}}", for_k: {num_classes}}}\n'
        "  random: {folder: concepts/random, split: 5}\n")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", type=Path)
    for name, param in inspect.signature(write_shapes_folder).parameters.items():
        if param.kind is not param.KEYWORD_ONLY:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(param.default, bool):
            ap.add_argument(flag, action="store_true", help="the oracle's data (training cue independent of the label)")
        else:
            ap.add_argument(flag, type=type(param.default), default=param.default, help=f"default: {param.default}")
    ap.add_argument("--twin", action="store_true", help="also write the oracle's copy in <root>_unbiased")
    args = vars(ap.parse_args(argv))
    root, twin = args.pop("root"), args.pop("twin")
    print(write_shapes_folder(root, **args))
    if twin:
        print(write_shapes_folder(unbiased_twin(root), **(args | {"unbiased": True})))


if __name__ == "__main__":
    main()
