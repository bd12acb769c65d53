"""Training samplers whose order is a pure function of ``(seed, epoch)``, also under DDP: the plain
shuffle, and the weighted or repeated draws of a :class:`~cdistill.robust.sampling.SamplePlan`."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler

from cdistill.robust.sampling import SamplePlan
from datamodules.splits import derive_seed


class EpochSeededSampler(DistributedSampler):
    """Shuffle ``range(num_samples)`` with a permutation fixed by ``(seed, epoch)``.

    ``RandomSampler`` draws from global RNG state, so a run resumed from a checkpoint would
    see a different order than an uninterrupted one. Here Lightning calls :meth:`set_epoch`
    at the start of every epoch and the order depends on nothing else.

    Under DDP, every rank draws the same global permutation and takes every
    ``num_replicas``-th index from position ``rank`` (padded by wrapping, as
    ``DistributedSampler`` does). With a per-rank batch ``B``, step ``k`` of all ranks
    together then covers exactly ``perm[k*B*W : (k+1)*B*W]``: the same global batch that one
    process with batch ``B*W`` sees, so single- and multi-process runs are comparable
    step by step. Being a ``DistributedSampler``, Lightning does not wrap (and reshuffle) it.

    Args:
        num_samples: Length of the dataset.
        seed: Base seed.
        num_replicas: Number of DDP processes.
        rank: This process's rank.
    """

    def __init__(self, num_samples: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler.__init__ wants a dataset and an initialised process group; set
        # the attributes it (and Lightning) read directly instead.
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.dataset_size = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.shuffle = True
        self.drop_last = False
        self.num_samples = math.ceil(self.dataset_size / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation for ``epoch``."""
        self.epoch = int(epoch)

    def permutation(self) -> torch.Tensor:
        """The current global order: ``int64 [dataset_size]``."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", str(self.epoch)))
        return torch.randperm(self.dataset_size, generator=gen)

    def __iter__(self) -> Iterator[int]:
        order = self.permutation().tolist()
        if self.total_size > len(order):  # pad so every rank gets the same count
            order += (order * math.ceil(self.total_size / max(len(order), 1)))[: self.total_size - len(order)]
        return iter(order[self.rank : self.total_size : self.num_replicas])

    def __len__(self) -> int:
        return self.num_samples


class PlannedEpochSampler(EpochSeededSampler):
    """Draw a :class:`~cdistill.robust.sampling.SamplePlan` (weighted draws with replacement, or a
    shuffle of a multiset of repeated indices) instead of a permutation; the draw is a pure
    function of ``(seed, epoch)`` and shared by the ranks as in :class:`EpochSeededSampler`.

    Args:
        plan: What one epoch draws (``plan.num_draws`` indices, all ranks together).
        seed: Base seed.
        num_replicas: Number of DDP processes.
        rank: This process's rank.
    """

    def __init__(self, plan: SamplePlan, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(plan.num_draws, seed=seed, num_replicas=num_replicas, rank=rank)
        self.plan = plan

    def permutation(self) -> torch.Tensor:
        """The current epoch's global draw: ``int64 [plan.num_draws]`` dataset indices."""
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "planned", str(self.epoch)))
        return self.plan.draw(gen)
