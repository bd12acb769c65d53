"""The in-memory dataset every MNIST benchmark split is stored in."""

from __future__ import annotations

import torch
from torch import Tensor

from cdistill.utils.datamodule import SplitDataset


class BiasedDigitsDataset(SplitDataset):
    """Rendered digits kept as ``uint8`` and normalised on access.

    Storing ``uint8`` keeps full MNIST with three channels around 110 MB instead of
    ~450 MB as ``float32``.

    Args:
        images: ``uint8 [N, C, 28, 28]`` rendered images.
        labels: ``int64 [N]`` digit classes.
        bias: ``int64 [N]`` the class the spurious cue points to under the training
            correlation, or ``-1`` when it points to none.
        digits: ``uint8 [N, 28, 28]`` the grey source digits (the foreground mask), kept so
            that concept code and tests can separate digit from cue.
        mean: ``float32 [C]`` per-channel mean of the training split in ``[0, 1]`` units.
        std: ``float32 [C]`` per-channel std of the training split.
        cue: ``int64 [N]`` the per-image random choice behind the cue where there is one
            (DecoyMNIST: the patch corner 0..3 = TL, TR, BL, BR), else ``-1``.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        bias: Tensor,
        digits: Tensor,
        mean: Tensor,
        std: Tensor,
        cue: Tensor | None = None,
    ) -> None:
        n = images.shape[0]
        if not (labels.shape == bias.shape == (n,) and digits.shape[0] == n):
            raise ValueError("images, labels, bias and digits must have the same length")
        self.images = images
        self.labels = labels
        self.bias = bias
        self.digits = digits
        self.cue = cue if cue is not None else torch.full((n,), -1, dtype=torch.int64)
        # [C, 1, 1] so they broadcast over one image [C, H, W].
        self.mean = mean.to(torch.float32).view(-1, 1, 1)
        self.std = std.to(torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def normalized(self, index: int | slice | Tensor) -> Tensor:
        """Normalised float images: ``float32 [C, 28, 28]`` (or ``[B, C, 28, 28]``)."""
        return (self.images[index].to(torch.float32) / 255.0 - self.mean) / self.std

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """One sample.

        Returns:
            ``{"image": float32 [C, 28, 28], "label": int64 [], "bias": int64 [],
            "index": int64 []}`` where ``index`` is the position within this split.
        """
        return {
            "image": self.normalized(index),
            "label": self.labels[index],
            "bias": self.bias[index],
            "index": torch.tensor(index, dtype=torch.int64),
        }
