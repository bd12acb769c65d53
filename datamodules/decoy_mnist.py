"""DecoyMNIST: a grey corner patch whose shade encodes the class (docs/methods.md §3).

After Ross et al. (2017), "Right for the Right Reasons": a 5x5 patch in a random corner,
grey level ``255 - 25y`` in training and ``25y`` at test.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from datamodules.biased_mnist import BiasedMNISTDataModule, Rendered

PATCH_SIZE = 5
#: Corner ids used in ``cue``: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right.
CORNERS: tuple[tuple[slice, slice], ...] = (
    (slice(0, PATCH_SIZE), slice(0, PATCH_SIZE)),
    (slice(0, PATCH_SIZE), slice(-PATCH_SIZE, None)),
    (slice(-PATCH_SIZE, None), slice(0, PATCH_SIZE)),
    (slice(-PATCH_SIZE, None), slice(-PATCH_SIZE, None)),
)


def train_grey(labels: Tensor) -> Tensor:
    """Patch grey level under the training correlation: ``255 - 25 y`` (int64, same shape)."""
    return 255 - 25 * labels


def decoy_bias(grey: Tensor) -> Tensor:
    """Class whose *training* grey level is nearest: ``clamp(round((255 - grey) / 25), 0, 9)``.

    Gives ``y`` on training patches. Test patches (``25 y``) map to ``round(10.2 - y)``
    clamped, so e.g. class 5 at test looks like class 5 and class 0 (a black, invisible
    patch) like class 9.
    """
    return torch.round((255 - grey.to(torch.float64)) / 25).clamp(0, 9).to(torch.int64)


class DecoyMNISTDataModule(BiasedMNISTDataModule):
    """Grey digits (1 channel) with a 5x5 patch in a random corner.

    * ``train``, ``val``: patch grey ``255 - 25y``; with ``unbiased`` the ``train`` patch
      takes the training grey of a uniformly random class (the oracle).
    * ``val_reversed``, ``test``: patch grey ``25y``.

    ``bias`` is :func:`decoy_bias` of the patch grey; ``cue`` is the corner id (see
    :data:`CORNERS`), drawn uniformly per image in every split. The patch overwrites the
    pixels underneath (MNIST digits leave the 4-pixel border empty, so it rarely hides ink).
    """

    name: str = "decoy_mnist"
    num_channels: ClassVar[int] = 1

    def render(
        self, split: str, digits: Tensor, labels: Tensor, generator: torch.Generator
    ) -> Rendered:
        """See :meth:`BiasedMNISTDataModule.render`; returns ``uint8 [N, 1, 28, 28]``."""
        grey = self.split_cue(split, labels, shifted=lambda: 25 * labels, train_cue=train_grey)
        corner = torch.randint(0, len(CORNERS), (labels.numel(),), generator=generator)
        images = digits.unsqueeze(1).clone()
        for cid, (rows, cols) in enumerate(CORNERS):
            hit = corner == cid
            images[hit, 0, rows, cols] = grey[hit].to(torch.uint8).view(-1, 1, 1)
        return Rendered(images, decoy_bias(grey), corner)
