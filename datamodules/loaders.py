"""The base of the split-based datamodules (:class:`SplitDataModule`): the constructor arguments
they share (:class:`LoaderSettings`) and their loaders, one shuffled, seeded train loader and one
unshuffled loader per evaluation split (:class:`SplitLoaders`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from cdistill.errors import CdistillError
from cdistill.robust.sampling import SamplePlan, balanced_plan, check_sampler
from cdistill.utils.datamodule import SplitDataset
from datamodules.sampler import EpochSeededSampler, PlannedEpochSampler


@dataclass
class LoaderSettings:
    """The constructor arguments every split datamodule takes, each default defined once here
    (a datamodule's ``**loader`` keyword arguments; ``data.<name>`` in the configs).

    Attributes:
        seed: Seeds the train order (and the datamodule's own random choices).
        batch_size: Train batch size (per process under DDP).
        eval_batch_size: Batch size of the val/test loaders.
        num_workers: DataLoader workers.
        pin_memory: DataLoader ``pin_memory``.
        max_train_samples: Cap on the train split (how it is taken is the datamodule's); None
            keeps all.
        sampler: ``data.sampler``: None (a seeded shuffle), ``group_balanced`` or
            ``class_balanced`` (:mod:`cdistill.robust.sampling`).

    Raises:
        CdistillError: A batch size or cap below 1, or an unknown sampler.
    """

    seed: int = 0
    batch_size: int = 64
    eval_batch_size: int = 256
    num_workers: int = 0
    pin_memory: bool = False
    max_train_samples: int | None = None
    sampler: str | None = None

    def __post_init__(self) -> None:
        if self.max_train_samples is not None and int(self.max_train_samples) < 1:
            raise CdistillError(f"data.max_train_samples={self.max_train_samples} must be >= 1, or null for all.")
        for key in ("batch_size", "eval_batch_size"):
            if int(getattr(self, key)) < 1:
                raise CdistillError(f"data.{key}={getattr(self, key)} must be >= 1.")
        self.sampler = check_sampler(self.sampler)
        self.seed, self.batch_size, self.eval_batch_size = int(self.seed), int(self.batch_size), int(self.eval_batch_size)
        self.max_train_samples = None if self.max_train_samples is None else int(self.max_train_samples)
        self.num_workers, self.pin_memory = int(self.num_workers), bool(self.pin_memory)


class SplitLoaders:
    """Mixin for a datamodule that serves named splits.

    The datamodule provides ``split(name) -> SplitDataset``, ``setup()``, the split names
    ``val_names`` and ``test_names`` and the :class:`LoaderSettings` as attributes (``seed``,
    ``batch_size``, ...: :class:`SplitDataModule` sets them); optionally ``num_classes`` and
    ``num_bias_groups``.
    """

    sampler: str | None = None

    seed: int
    batch_size: int
    eval_batch_size: int
    num_workers: int
    pin_memory: bool
    max_train_samples: int | None
    val_names: Sequence[str]
    test_names: Sequence[str]
    trainer: pl.Trainer | None

    def setup(self, stage: str | None = None) -> None:  # pragma: no cover - the datamodule's own
        raise NotImplementedError

    def split(self, name: str) -> SplitDataset:  # pragma: no cover - the datamodule's own
        raise NotImplementedError

    def _loader(self, dataset: SplitDataset, batch_size: int, **kw: Any) -> DataLoader[Any]:
        return DataLoader(dataset, batch_size=batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, **kw)

    def train_plan(self, train: SplitDataset) -> SamplePlan | None:
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
            EpochSeededSampler(len(train), seed=self.seed, num_replicas=replicas, rank=rank)
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


class SplitDataModule(SplitLoaders, pl.LightningDataModule):
    """The base of the datamodules here: named splits served by :class:`SplitLoaders`, set up
    from the shared constructor arguments.

    A subclass implements ``setup()`` and ``split(name)``, sets ``val_names`` and ``test_names``
    (and what :class:`cdistill.utils.datamodule.SplitData` asks for besides), and passes its
    ``**loader`` keyword arguments on to this constructor.

    Args:
        **loader: :class:`LoaderSettings`.
    """

    def __init__(self, **loader: Any) -> None:
        super().__init__()
        settings = LoaderSettings(**loader)
        for field in dataclasses.fields(settings):  # self.seed, self.batch_size, ...
            setattr(self, field.name, getattr(settings, field.name))

