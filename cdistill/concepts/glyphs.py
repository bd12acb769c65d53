"""Small class-specific glyphs (MarkerMNIST's bias cue and its concept sets).

One implementation shared by the datamodule (``datamodules/marker_mnist.py``) and the concept
generator (:func:`cdistill.concepts.generate`, ``kind: glyph``), so concept images carry
exactly the marks the data carries. Glyphs are 5x5 binary shapes drawn at one grey level
(luminance only) at a position that avoids the ink already in the image: a local artefact,
like a ruler or a watermark.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cdistill.errors import CdistillError

#: Side of every glyph, in pixels.
GLYPH_SIZE = 5
#: Glyph names in class order: glyph ``k`` marks class ``k`` under the training correlation.
GLYPH_NAMES: tuple[str, ...] = (
    "plus", "ring", "triangle", "bar", "cross", "square", "diamond", "corner", "dots", "tee",
)
_SHAPES: tuple[str, ...] = (
    # plus      ring       triangle   bar        cross
    "..#.. .###. ..#.. ..... #...#",
    "..#.. #...# ..#.. ..... .#.#.",
    "##### #...# .###. ##### ..#..",
    "..#.. #...# .###. ##### .#.#.",
    "..#.. .###. ##### ..... #...#",
    # square    diamond    corner     dots       tee
    "##### ..#.. #.... ##... #####",
    "#...# .#.#. #.... ##... ..#..",
    "#...# #...# #.... ..... ..#..",
    "#...# .#.#. #.... ...## ..#..",
    "##### ..#.. ##### ...## ..#..",
)


def glyph_masks(size: int = GLYPH_SIZE) -> Tensor:
    """The ten glyphs as ``bool [10, size, size]`` (row-major, top row first).

    Args:
        size: Side in pixels; the 5x5 designs are enlarged by nearest-neighbour sampling.
    """
    if int(size) < GLYPH_SIZE:
        raise CdistillError(f"Glyph size {size} is below the {GLYPH_SIZE}x{GLYPH_SIZE} designs; use >= {GLYPH_SIZE}.")
    rows = [line.split() for line in _SHAPES]  # 10 lines x 5 glyphs per line
    masks = torch.zeros(len(GLYPH_NAMES), GLYPH_SIZE, GLYPH_SIZE, dtype=torch.bool)
    for k in range(len(GLYPH_NAMES)):
        block, col = divmod(k, 5)
        for r in range(GLYPH_SIZE):
            masks[k, r] = torch.tensor([ch == "#" for ch in rows[5 * block + r][col]])
    if size == GLYPH_SIZE:
        return masks
    big = F.interpolate(masks.unsqueeze(1).float(), size=(int(size), int(size)), mode="nearest")
    return big.squeeze(1) > 0.5


def free_positions(ink: Tensor, generator: torch.Generator, size: int = GLYPH_SIZE) -> tuple[Tensor, Tensor]:
    """Pick, per image, a random top-left corner for a ``size x size`` glyph away from the ink.

    Preference order (random among the best tier): boxes that miss the ink's bounding box
    entirely (the digit's margin); else boxes over no ink; else the boxes over the least ink.
    An empty image accepts any position.

    Args:
        ink: ``[N, H, W]`` image intensities (any dtype); > 0 counts as ink.
        generator: Draws the tie-break among the best positions.
        size: Glyph side.

    Returns:
        ``(rows, cols)``, each ``int64 [N]``, top-left corners in ``[0, H - size]`` x
        ``[0, W - size]``.
    """
    _, h, w = ink.shape
    if h < size or w < size:
        raise CdistillError(f"Images of {h}x{w} pixels are too small for a {size}x{size} glyph.")
    on = (ink > 0).to(torch.float32)
    # Ink under each candidate box: [N, H - size + 1, W - size + 1].
    covered = F.avg_pool2d(on.unsqueeze(1), size, stride=1).squeeze(1) * size * size
    cost = covered + _bbox_overlap(on, size) * (size * size + 1)  # bbox hits rank below ink-free
    best = cost.amin(dim=(1, 2), keepdim=True)
    score = torch.rand(cost.shape, generator=generator)
    score[cost > best] = -1.0
    flat = score.flatten(1).argmax(dim=1)
    return flat // cost.shape[2], flat % cost.shape[2]


def _bbox_overlap(on: Tensor, size: int) -> Tensor:
    """1.0 where a ``size`` box at that top-left corner meets the ink's bounding box:
    ``float32 [N, H - size + 1, W - size + 1]`` (0 everywhere for an empty image)."""
    _, h, w = on.shape
    rows_any, cols_any = on.amax(dim=2) > 0, on.amax(dim=1) > 0  # [N, H], [N, W]
    r = torch.arange(h)
    c = torch.arange(w)
    top = torch.where(rows_any, r, h).amin(dim=1)
    bottom = torch.where(rows_any, r, -1).amax(dim=1)
    left = torch.where(cols_any, c, w).amin(dim=1)
    right = torch.where(cols_any, c, -1).amax(dim=1)
    r0 = torch.arange(h - size + 1).view(1, -1)
    c0 = torch.arange(w - size + 1).view(1, -1)
    meets_r = (r0 <= bottom[:, None]) & (r0 + size - 1 >= top[:, None])  # [N, H']
    meets_c = (c0 <= right[:, None]) & (c0 + size - 1 >= left[:, None])  # [N, W']
    return (meets_r[:, :, None] & meets_c[:, None, :]).to(torch.float32)


def stamp_glyphs(
    images: Tensor, glyph: Tensor, rows: Tensor, cols: Tensor, level: int = 255, size: int = GLYPH_SIZE
) -> Tensor:
    """Draw glyph ``glyph[i]`` into image ``i`` with its top-left corner at ``(rows[i], cols[i])``.

    Glyph pixels are set to ``level``; the rest of the image is unchanged.

    Args:
        images: ``uint8 [N, H, W]`` grey images (not modified).
        glyph: ``int64 [N]`` glyph ids in ``0..9``.
        rows: ``int64 [N]`` top rows.
        cols: ``int64 [N]`` left columns.
        level: Grey level of the glyph, ``1..255``.
        size: Glyph side (see :func:`glyph_masks`).

    Returns:
        ``uint8 [N, H, W]``.
    """
    if not 1 <= int(level) <= 255:
        raise CdistillError(f"Glyph level {level} must be in 1..255.")
    masks = glyph_masks(size)[glyph]  # [N, size, size]
    out = images.clone()
    dy, dx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    n_idx = torch.arange(len(glyph)).view(-1, 1, 1).expand_as(masks)
    yy = rows.view(-1, 1, 1) + dy
    xx = cols.view(-1, 1, 1) + dx
    out[n_idx[masks], yy[masks], xx[masks]] = int(level)
    return out


def draw_glyphs(
    images: Tensor,
    glyph: Tensor,
    generator: torch.Generator,
    level: int = 255,
    size: int = GLYPH_SIZE,
    copies: int = 1,
) -> tuple[Tensor, Tensor]:
    """Stamp glyph ``glyph[i]`` into image ``i``, ``copies`` times, each at a random position
    away from the ink already there (the digit and the earlier copies).

    Args:
        images: ``uint8 [N, H, W]`` grey images (digits or strokes).
        glyph: ``int64 [N]`` glyph ids.
        generator: Draws the positions.
        level: Glyph grey level.
        size: Glyph side (see :func:`glyph_masks`).
        copies: Glyphs per image (a repeated watermark when > 1).

    Returns:
        ``(uint8 [N, H, W] stamped images, int64 [N, copies, 2] top-left corners (row, col))``.
    """
    if int(copies) < 1:
        raise CdistillError(f"Glyph copies={copies} must be >= 1.")
    out, corners = images, []
    for _ in range(int(copies)):
        rows, cols = free_positions(out, generator, size)
        out = stamp_glyphs(out, glyph, rows, cols, level, size)
        corners.append(torch.stack([rows, cols], dim=1))
    return out, torch.stack(corners, dim=1)
