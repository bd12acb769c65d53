"""ColorMNIST: the digit's colour is the spurious cue (docs/methods.md §3)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from cdistill.concepts.palette import PALETTE
from cdistill.concepts.textures import NUM_TEXTURES, make_textures
from datamodules.biased_mnist import BiasedMNISTDataModule, Rendered, alpha_fill


class ColorMNISTDataModule(BiasedMNISTDataModule):
    """Grey digits multiplied by a palette colour; 3 channels.

    Splits and ``bias`` (the palette class the colour points to, -1 for none):

    * ``train``, ``val``: colour ``PALETTE[y]`` (100% correlation); bias ``y``. With
      ``unbiased`` the ``train`` colour is a uniformly random palette colour (the oracle).
    * ``val_reversed``, ``test``: ``PALETTE[9 - y]``; bias ``9 - y``.
    * ``test_random_color``: a uniformly random palette colour per digit; bias = its index.
    * ``test_pixel_hard``: a random palette colour per pixel; bias -1.
    * ``test_random_texture``: the digit filled with a random texture from
      :mod:`cdistill.concepts.textures`; bias -1.

    ``cue`` records the palette index (train to random-colour splits) or texture id
    (random-texture split); -1 for pixel-hard.
    """

    name: str = "color_mnist"
    num_channels: ClassVar[int] = 3
    random_cue_split: ClassVar[str | None] = "test_random_color"
    extra_test_names: ClassVar[tuple[str, ...]] = (
        "test_random_color",
        "test_pixel_hard",
        "test_random_texture",
    )

    def render(
        self, split: str, digits: Tensor, labels: Tensor, generator: torch.Generator
    ) -> Rendered:
        """See :meth:`BiasedMNISTDataModule.render`; returns ``uint8 [N, 3, 28, 28]``."""
        n = labels.numel()
        none = torch.full((n,), -1, dtype=torch.int64)
        if split == "test_pixel_hard":
            per_pixel = torch.randint(0, len(PALETTE), digits.shape, generator=generator)
            return Rendered(alpha_fill(digits, PALETTE, per_pixel), none, none)
        if split == "test_random_texture":
            texture = torch.randint(0, NUM_TEXTURES, (n,), generator=generator)
            return Rendered(alpha_fill(digits, make_textures(), texture), none, texture)
        colour = self.split_cue(split, labels, shifted=lambda: 9 - labels, extra={
            "test_random_color": lambda: torch.randint(0, len(PALETTE), (n,), generator=generator),
        })
        return Rendered(alpha_fill(digits, PALETTE, colour), colour, colour)
