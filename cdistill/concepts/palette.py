"""The ColorMNIST palette: the ten colours of the colour bias and of its concept sets."""

from __future__ import annotations

import torch
from torch import Tensor

#: Ten colours evenly spaced in HSL from red to purple: ``uint8 [10, 3]``; class y is
#: painted ``PALETTE[y]`` in training.
PALETTE: Tensor = torch.tensor(
    [
        [0xFF, 0x00, 0x00],
        [0xF1, 0x86, 0x00],
        [0xCA, 0xE3, 0x00],
        [0x47, 0xD5, 0x00],
        [0x00, 0xC7, 0x2C],
        [0x00, 0xB8, 0x8F],
        [0x00, 0x72, 0xAA],
        [0x00, 0x11, 0x9C],
        [0x3F, 0x00, 0x8E],
        [0x80, 0x00, 0x80],
    ],
    dtype=torch.uint8,
)
