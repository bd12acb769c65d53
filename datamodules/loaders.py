"""Data loaders of the split-based datamodules: one shuffled, seeded train loader and one
unshuffled loader per evaluation split."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from cdistill.errors import CdistillError
from cdistill.robust.sampling import SamplePlan, balanced_plan
from datamodules.sampler import EpochSeededSampler, PlannedEpochSampler


class SplitLoaders:
    """Mixin for a datamodule that serves named splits.

    The datamodule provides ``split(name) -> Dataset``, ``setup()``, the split names
    ``val_names`` and ``test_names``, and ``seed``, ``batch_size``, ``eval_batch_size``,
    ``num_workers``, ``pin_memory``; optionally ``sampler`` (``data.sampler``: None,
    ``group_balanced`` or ``class_balanced``), ``num_classes`` and ``num_bias_groups``.
    """

    sampler: str | None = None

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

    def train_plan(self, train: Dataset[Any]) -> SamplePlan | None:
        """What the training loader draws other than a plain shuffle: the task's plan (its
        ``train_sample_plan(dataset)``, e.g. JTT's upsampled error set), or ``data.sampler``'s
        balanced draw, or None.

        Raises:
            CdistillError: Both the task and ``data.sampler`` want to choose the draw.
        """
        module = self.trainer.lightning_module if self.trainer is not None else None
        hook = getattr(module, "train_sample_plan", None)
        plan: SamplePlan | None = hook(train) if callable(hook) else None
        if plan is not None and self.sampler:
            raise CdistillError(
                f"data.sampler={self.sampler} and the task ({type(module).__name__}) both choose the training "
                "draw: remove the sampler (sampler=null) for this method."
            )
        if plan is None and self.sampler:
            labels = getattr(train, "labels", None)
            num_classes = int(getattr(self, "num_classes", 0) or (int(labels.max()) + 1 if labels is not None else 1))
            num_bias = int(getattr(self, "num_bias_groups", None) or num_classes)
            plan = balanced_plan(train, self.sampler, num_classes, num_bias)
        return plan

    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled by an :class:`EpochSeededSampler` (order fixed by seed and epoch; under DDP
        each rank takes its share of the same global order), or drawn by a
        :class:`PlannedEpochSampler` when :meth:`train_plan` gives a plan."""
        train = self.split("train")
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        plan = self.train_plan(train)
        sampler: EpochSeededSampler = (
            EpochSeededSampler(len(train), seed=self.seed, num_replicas=replicas, rank=rank)  # type: ignore[arg-type]
            if plan is None else PlannedEpochSampler(plan, seed=self.seed, num_replicas=replicas, rank=rank)
        )
        return self._loader(train, self.batch_size, sampler=sampler)

    def val_dataloader(self) -> list[DataLoader[Any]]:
        """One unshuffled loader per name in :attr:`val_names`, in that order."""
        self.setup()
        return [self._loader(self.split(n), self.eval_batch_size, shuffle=False) for n in self.val_names]

    def test_dataloader(self) -> list[DataLoader[Any]]:
        """One unshuffled loader per name in :attr:`test_names`, in that order."""
        self.setup()
        return [self._loader(self.split(n), self.eval_batch_size, shuffle=False) for n in self.test_names]
