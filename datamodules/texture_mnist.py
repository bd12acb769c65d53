"""TextureMNIST: the texture filling the digit is the spurious cue (docs/methods.md §3)."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from cdistill.concepts.textures import NUM_TEXTURES, make_textures
from datamodules.biased_mnist import BiasedMNISTDataModule, Rendered, alpha_fill


class TextureMNISTDataModule(BiasedMNISTDataModule):
    """Digit foreground (grey level as alpha) filled with one of ten textures; 3 channels.

    * ``train``, ``val``: texture ``y`` (100% correlation); with ``unbiased`` the ``train``
      texture is uniformly random (the oracle).
    * ``val_reversed``, ``test``: a uniformly random texture per image (docs/methods.md §3: test
      digits get random textures). ``val_reversed`` follows the test distribution so that
      the paper's reversed-bias model selection is possible; about 10% of its images are
      bias-aligned by chance.

    ``bias`` and ``cue`` are the texture id. Textures are procedural; see
    :mod:`cdistill.concepts.textures` for the source.
    """

    name: str = "texture_mnist"
    num_channels: ClassVar[int] = 3
    random_cue_split: ClassVar[str | None] = "test"  # its test textures are drawn at random already

    def render(
        self, split: str, digits: Tensor, labels: Tensor, generator: torch.Generator
    ) -> Rendered:
        """See :meth:`BiasedMNISTDataModule.render`; returns ``uint8 [N, 3, 28, 28]``."""
        texture = self.split_cue(
            split, labels, shifted=lambda: torch.randint(0, NUM_TEXTURES, (labels.numel(),), generator=generator)
        )
        return Rendered(alpha_fill(digits, make_textures(), texture), texture, texture)
