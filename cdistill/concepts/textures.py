"""Ten procedural RGB textures for TextureMNIST (and ColorMNIST's random-texture test).

Source: generated here from closed-form patterns; no external images are used, so the
benchmark needs no download and is identical everywhere. Each texture mixes a binary
pattern with its own pair of colours:

====  =========================================  ===================
 id   pattern                                    colours (on / off)
====  =========================================  ===================
 0    horizontal stripes, period 4 px            gold / dodger blue
 1    vertical stripes, period 4 px              orange-red / white
 2    diagonal stripes (45°), period 6 px        lime / hot pink
 3    anti-diagonal stripes (135°), period 6 px  violet / light yellow
 4    checkerboard, 4 px cells                   dark turquoise / dark orange
 5    dots on a 6 px grid                        white / crimson
 6    concentric rings, 2.5 px wide              lawn green / royal blue
 7    wavy stripes (sine-warped)                 deep pink / spring green
 8    fine checkerboard, 2 px cells              khaki / saddle brown
 9    grid lines every 5 px                      deep sky blue / tomato
====  =========================================  ===================

Colours are bright enough that a textured digit stays visible on the black background.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NUM_TEXTURES = 10

_COLOURS: list[tuple[str, str]] = [
    ("ffd700", "1e90ff"),
    ("ff4500", "f5f5f5"),
    ("32cd32", "ff69b4"),
    ("8a2be2", "ffff66"),
    ("00ced1", "ff8c00"),
    ("ffffff", "dc143c"),
    ("7cfc00", "4169e1"),
    ("ff1493", "00fa9a"),
    ("f0e68c", "8b4513"),
    ("00bfff", "ff6347"),
]


def _hex(colour: str) -> Tensor:
    """``"rrggbb"`` -> ``float32 [3]`` in 0..255."""
    return torch.tensor([int(colour[i : i + 2], 16) for i in (0, 2, 4)], dtype=torch.float32)


def _patterns(size: int) -> Tensor:
    """Binary masks of the ten patterns: ``bool [10, size, size]``."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    yf, xf = y.float(), x.float()
    centre = (size - 1) / 2
    radius = torch.sqrt((xf - centre) ** 2 + (yf - centre) ** 2)
    warp = torch.sin(2 * math.pi * xf / 7 + 2.5 * torch.sin(2 * math.pi * yf / 10))
    return torch.stack(
        [
            (y // 2) % 2 == 0,
            (x // 2) % 2 == 0,
            ((x + y) // 3) % 2 == 0,
            ((x - y + 3 * size) // 3) % 2 == 0,  # offset keeps floor division non-negative
            ((x // 4) + (y // 4)) % 2 == 0,
            (xf % 6 - 2.5) ** 2 + (yf % 6 - 2.5) ** 2 <= 2.0**2,
            torch.floor(radius / 2.5) % 2 == 0,
            warp > 0,
            ((x // 2) + (y // 2)) % 2 == 0,
            (x % 5 == 0) | (y % 5 == 0),
        ]
    )


def make_textures(size: int = 28) -> Tensor:
    """Render the ten textures.

    Args:
        size: Side length in pixels.

    Returns:
        ``uint8 [10, 3, size, size]``; deterministic (no randomness involved).
    """
    masks = _patterns(size).to(torch.float32).unsqueeze(1)  # [10, 1, S, S]
    on = torch.stack([_hex(a) for a, _ in _COLOURS]).view(NUM_TEXTURES, 3, 1, 1)
    off = torch.stack([_hex(b) for _, b in _COLOURS]).view(NUM_TEXTURES, 3, 1, 1)
    return (masks * on + (1 - masks) * off).round().to(torch.uint8)
