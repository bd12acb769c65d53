"""Data loaders of the split-based datamodules: one shuffled, seeded train loader and one
unshuffled loader per evaluation split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from datamodules.sampler import EpochSeededSampler


class SplitLoaders:
    """Mixin for a datamodule that serves named splits.

    The datamodule provides ``split(name) -> Dataset``, ``setup()``, the split names
    ``val_names`` and ``test_names``, and ``seed``, ``batch_size``, ``eval_batch_size``,
    ``num_workers``, ``pin_memory``.
    """

    seed: int
    batch_size: int
    eval_batch_size: int
    num_workers: int
    pin_memory: bool
    val_names: Sequence[str]
    test_names: Sequence[str]
    trainer: pl.Trainer | None

    def setup(self, stage: str | None = None) -> None:  # pragma: no cover - the datamodule's own
        raise NotImplementedError

    def split(self, name: str) -> Dataset[Any]:  # pragma: no cover - the datamodule's own
        raise NotImplementedError

    def _loader(self, dataset: Dataset[Any], batch_size: int, **kw: Any) -> DataLoader[Any]:
        return DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, **kw)

    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled by an :class:`EpochSeededSampler` (order fixed by seed and epoch; under DDP
        each rank takes its share of the same global order)."""
        train = self.split("train")
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochSeededSampler(len(train), seed=self.seed, num_replicas=replicas, rank=rank)  # type: ignore[arg-type]
        return self._loader(train, self.batch_size, sampler=sampler)

    def val_dataloader(self) -> list[DataLoader[Any]]:
        """One unshuffled loader per name in :attr:`val_names`, in that order."""
        self.setup()
        return [self._loader(self.split(n), self.eval_batch_size, shuffle=False) for n in self.val_names]

    def test_dataloader(self) -> list[DataLoader[Any]]:
        """One unshuffled loader per name in :attr:`test_names`, in that order."""
        self.setup()
        return [self._loader(self.split(n), self.eval_batch_size, shuffle=False) for n in self.test_names]
