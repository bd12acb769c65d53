"""``last.ckpt`` that always holds the latest completed epoch (and, if asked, mid-epoch progress).

Lightning 2.6's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only at the steps
where it also saves a top-k checkpoint, so a run whose best epoch is not the last one leaves a
stale ``last.ckpt`` behind, and resuming from it silently repeats epochs.
:class:`LastCheckpoint` writes ``last.ckpt`` at the end of every epoch whatever the metrics.

It must run after every other checkpoint callback of the epoch (``train()`` puts it last), so
that the callback states it stores (e.g. the protocol selectors' best epochs) include this
epoch. The file is written to a temporary name and renamed into place, so a kill while saving
leaves the previous ``last.ckpt`` intact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from weakref import proxy

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from typing_extensions import override


class LastCheckpoint(ModelCheckpoint):
    """Write ``<dirpath>/last.ckpt`` after every epoch (after validation when it runs).

    Resuming from it (``ckpt_path=<run>/checkpoints/last.ckpt``) repeats the uninterrupted run
    exactly (see ``train.resolve_ckpt_path``).

    Args:
        dirpath: Folder of ``last.ckpt`` (the run's ``checkpoints/``).
        every_n_train_steps: Also write it every this many optimiser steps, mid-epoch (0: only
            at epoch ends). Lightning resumes a mid-epoch checkpoint from the start of that
            epoch's data with the step count kept, so such a resume is not exact; the
            end-of-epoch one is.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 0) -> None:
        if every_n_train_steps < 0:
            from cdistill.errors import CdistillError

            raise CdistillError(
                f"callbacks.last_checkpoint.every_n_train_steps={every_n_train_steps}: use 0 (epoch ends only) or a "
                "positive number of steps."
            )
        # save_top_k=0: no top-k files, only last.ckpt; no version counter: always the same file.
        super().__init__(dirpath=dirpath, monitor=None, save_top_k=0, save_last=True, enable_version_counter=False)
        self.every_n_steps = every_n_train_steps

    @property
    @override
    def state_key(self) -> str:
        # Distinct from a ModelCheckpoint with the same dirpath (the monitored one).
        return f"LastCheckpoint{{'dirpath': {self.dirpath!r}}}"

    def _skip(self, trainer: pl.Trainer) -> bool:
        from pytorch_lightning.trainer.states import TrainerFn

        return bool(getattr(trainer, "fast_dev_run", False)) or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking

    def _save_last(self, trainer: pl.Trainer) -> None:
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        """Mid-epoch progress, every ``every_n_train_steps`` steps (off by default)."""
        step = trainer.global_step
        due = self.every_n_steps > 0 and step % self.every_n_steps == 0 and step != self._last_global_step_saved
        if due and not self._skip(trainer):
            self._save_last(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Epoch end of a run without validation this epoch."""
        if not self._skip(trainer) and self._should_save_on_train_epoch_end(trainer):
            self._save_last(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Epoch end after validation: the metrics and every other checkpoint callback are updated."""
        if not self._skip(trainer) and not self._should_save_on_train_epoch_end(trainer):
            self._save_last(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing more: the last epoch end already wrote ``last.ckpt``."""

    @override
    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        # Write beside the target and rename: the old last.ckpt survives a kill mid-write.
        tmp = str(Path(filepath).with_name(f".{Path(filepath).name}.tmp"))
        trainer.save_checkpoint(tmp, self.save_weights_only)
        if trainer.is_global_zero:
            os.replace(tmp, filepath)
        trainer.strategy.barrier()
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))
