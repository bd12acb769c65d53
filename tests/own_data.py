"""A tiny generated dataset in the layout of the README's "Use your own data": two classes (a
square or a disc), a colour cue (red or green) that matches the class in most training images,
and concept folders bias_0 (red blobs), bias_1 (green blobs) and random (random colours). The larger
K-class version, with an unbiased twin: datamodules/shapes_folder.py (whose drawing this uses)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.shapes_folder import PALETTE, draw_shape

COLOURS = PALETTE[:2]  # the cue of class 0 (red) and of class 1 (green)
SPEC = """image_size: 32
channels: 3
sets:
  bias_{k}: {folder: "concepts/bias_{k}", for_k: 2}
  random: {folder: concepts/random, split: 5}
"""


def _shape(label: int, colour: tuple[int, ...], rng: np.random.Generator, size: int = 24) -> Image.Image:
    """A filled square (label 0) or disc (label 1) of ``colour`` on a dark noisy background."""
    return draw_shape(label, colour, rng, size, centre=(9, 15), radius=(5, 8))


def write_own_data(root: Path, n_train: int = 40, n_eval: int = 12, seed: int = 0) -> Path:
    """Write ``metadata.csv``, ``images/`` and the concept spec and folders under ``root``."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    plan = [("train", i % 2, i % 2 if i % 10 else 1 - i % 2) for i in range(n_train)]  # 90% aligned
    plan += [("val", i % 2, (i // 2) % 2) for i in range(n_eval)] + [("test", i % 2, 1 - i % 2) for i in range(n_eval)]
    for i, (split, label, bias) in enumerate(plan):
        rel = f"images/{i:05d}.png"
        _shape(label, COLOURS[bias], rng).save(root / rel)
        rows.append([rel, label, bias, split])
    with (root / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "bias", "split"])
        writer.writerows(rows)
    for k, colour in enumerate(COLOURS):
        folder = root / "concepts" / f"bias_{k}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(16):
            _shape(int(rng.integers(0, 2)), colour, rng, 20).save(folder / f"{j}.png")
    folder = root / "concepts" / "random"
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(40):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        _shape(int(rng.integers(0, 2)), colour, rng, 20).save(folder / f"{j}.png")
    (root / "concepts.yaml").write_text(SPEC)
    return root
