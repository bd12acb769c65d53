"""A shuffling sampler whose order is a pure function of ``(seed, epoch)``."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from datamodules.splits import derive_seed


class EpochSeededSampler(Sampler[int]):
    """Shuffle ``range(num_samples)`` with a permutation fixed by ``(seed, epoch)``.

    ``RandomSampler`` draws from global RNG state, so a run resumed from a checkpoint
    would see a different order than an uninterrupted one. Here Lightning calls
    :meth:`set_epoch` at the start of every epoch (also under DDP, where its
    ``DistributedSamplerWrapper`` forwards the call), and the order depends on nothing
    else.

    Args:
        num_samples: Length of the dataset.
        seed: Base seed.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation for ``epoch``."""
        self.epoch = int(epoch)

    def permutation(self) -> torch.Tensor:
        """The current order: ``int64 [num_samples]``."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", str(self.epoch)))
        return torch.randperm(self.num_samples, generator=gen)

    def __iter__(self) -> Iterator[int]:
        return iter(self.permutation().tolist())

    def __len__(self) -> int:
        return self.num_samples
