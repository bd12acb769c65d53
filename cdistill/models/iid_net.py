"""A small two-branch U-Net for intrinsic image decomposition.

One shared encoder, a reflectance decoder ``r_dec`` and a shading decoder ``s_dec``. Every
block is a named submodule, so layers are addressable by path for hooks and concept losses
(``r_dec.up1`` is the reflectance branch's first decoder block, at half resolution).
No batch norm: samples never interact, so the gradient of a batch sum gives every
per-sample gradient at once (what the concept loss needs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdistill.utils.registry import Registry


def block(cin: int, cout: int) -> nn.Sequential:
    """Two 3x3 convolutions with ReLU, resolution kept."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.ReLU())


class Encoder(nn.Module):
    """``inc`` (full resolution, ``w`` channels), ``down1`` (1/2, ``2w``), ``down2`` (1/4, ``4w``)."""

    def __init__(self, in_chans: int, width: int) -> None:
        super().__init__()
        self.inc = block(in_chans, width)
        self.down1 = block(width, 2 * width)
        self.down2 = block(2 * width, 4 * width)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Features at full, half and quarter resolution."""
        e0 = self.inc(x)
        e1 = self.down1(F.max_pool2d(e0, 2))
        e2 = self.down2(F.max_pool2d(e1, 2))
        return e0, e1, e2


class Decoder(nn.Module):
    """``up1`` (1/2 resolution, ``2w``), ``up2`` (full, ``w``), ``head`` (1x1 conv, sigmoid)."""

    def __init__(self, width: int, out_chans: int) -> None:
        super().__init__()
        self.up1 = block(6 * width, 2 * width)
        self.up2 = block(3 * width, width)
        self.head = nn.Conv2d(width, out_chans, 1)

    def forward(self, feats: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        e0, e1, e2 = feats
        d1 = self.up1(torch.cat([F.interpolate(e2, scale_factor=2.0, mode="nearest"), e1], 1))
        d0 = self.up2(torch.cat([F.interpolate(d1, scale_factor=2.0, mode="nearest"), e0], 1))
        return torch.sigmoid(self.head(d0))


class IIDUNet(nn.Module):
    """Shared encoder, reflectance and shading decoders.

    Args:
        in_chans: Image channels. width: Channels of the first block (``w``).
        r_chans: Reflectance channels. s_chans: Shading channels (3: coloured light; 1: grey).
    """

    def __init__(self, in_chans: int = 3, width: int = 16, r_chans: int = 3, s_chans: int = 3) -> None:
        super().__init__()
        self.enc = Encoder(in_chans, width)
        self.r_dec = Decoder(width, r_chans)
        self.s_dec = Decoder(width, s_chans)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, C, H, W]`` (H, W divisible by 4) -> ``(R [B, r_chans, H, W], S [B, s_chans, H, W])`` in ``(0, 1)``."""
        feats = self.enc(x)
        return self.r_dec(feats), self.s_dec(feats)


NETS: Registry[type[IIDUNet]] = Registry("IID network", "Set model.student.name to one of them.")
NETS.register("iid_unet")(IIDUNet)


def create_iid_net(name: str = "iid_unet", **kwargs: int) -> IIDUNet:
    """Build a registered decomposition network (``model.student.name``).

    Raises:
        CdistillError: Unknown name (valid names listed).
    """
    return NETS.get(name)(**kwargs)
