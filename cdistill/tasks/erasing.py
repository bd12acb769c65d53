"""The erasure part of the concept-distillation task: linear concept erasers (docs/methods.md §4)
fitted for the bias concept at the configured layers, refitted on a schedule, applied as
forward hooks in every forward, and checked by a linear bias probe at test time."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cdistill.erasure import LeaceFitter
from cdistill.erasure.hooks import (
    ErasureSpec,
    bias_probe_accuracy,
    erase,
    eraser_key,
    fit_layer_erasers,
)
from cdistill.objective.distill_config import DistillConfig
from cdistill.tasks.classifier import ClassifierModule
from cdistill.utils.datamodule import SplitData, SplitDataset, attached_data

log = logging.getLogger(__name__)


class ErasureMixin(ClassifierModule):
    """Erasers of a :class:`ClassifierModule` (mixed into the distill task, which sets
    ``cfg``, ``erasers`` and ``artefacts_fitted``)."""

    #: The task's settings (``cfg.erasure``: ``None``, no erasers).
    cfg: DistillConfig
    erasers: nn.ModuleDict
    artefacts_fitted: Tensor

    @property
    def erasure_specs(self) -> tuple[ErasureSpec, ...]:
        return self.cfg.erasure.specs if self.cfg.erasure is not None else ()

    def fit_erasers(self, datamodule: SplitData) -> None:
        """Fit the erasers on the whole train split with the current student.

        Under DDP with streaming methods (LEACE, orth) rank r streams samples r, r + W, ...
        (every sample exactly once: no DistributedSampler padding is counted twice, and
        unequal shards are fine) and the statistics are summed across ranks before the build.
        Other methods keep activations in memory and fit on the whole split on every rank.
        Either way the task's broadcast then gives all ranks rank 0's buffers, bitwise.
        """
        train: SplitDataset | torch.utils.data.Subset[dict[str, Tensor]] = datamodule.split("train")
        trainer = self._trainer
        world = trainer.world_size if trainer is not None else 1
        reduce: Callable[[LeaceFitter], object] | None = None
        if world > 1 and dist.is_initialized() and all(s.streaming for s in self.erasure_specs):
            assert trainer is not None
            train = torch.utils.data.Subset(train, range(trainer.global_rank, len(train), world))
            reduce = LeaceFitter.all_reduce_
        loader = torch.utils.data.DataLoader(train, batch_size=self.hparams["fit_batch_size"], shuffle=False)
        fitted = fit_layer_erasers(self.student, list(self.erasure_specs), loader, self.hparams["num_bias_groups"],
                                   reduce=reduce)
        for layer, eraser in fitted.items():
            self.erasers[eraser_key(layer)] = eraser.float().to(self.device)
        log.info("fitted erasers: %s", {k: repr(v) for k, v in self.erasers.items()})

    def _refit_due(self, step: int, batch_idx: int) -> bool:
        """Refit the erasers now? Every ``refit_every_n_steps`` steps, and/or after the last
        batch of every ``refit_every_n_epochs``-th epoch, so that validation, the checkpoint
        and the test see erasers fitted on the weights they evaluate. (The student keeps
        training under a frozen eraser and moves the concept into directions it does not
        touch: without refits a probe after fine-tuning finds the concept again.)"""
        if self.cfg.erasure is None:
            return False
        every = self.cfg.erasure.refit
        if every.step_due(step):
            return True
        trainer = self._trainer
        if trainer is None or batch_idx + 1 < int(trainer.num_training_batches):
            return False
        return every.epoch_due(self.current_epoch + 1)

    def _layer_erasers(self) -> tuple[dict[str, nn.Module], dict[str, str]]:
        """Layer path -> eraser and layer path -> mode, in spec order."""
        erasers = {s.layer: self.erasers[eraser_key(s.layer)] for s in self.erasure_specs}
        return erasers, {s.layer: s.mode for s in self.erasure_specs}

    def _erasing(self) -> AbstractContextManager[None]:
        """Context applying the erasers, once fitted (before that, e.g. a bare module: none)."""
        if not self.erasure_specs or not bool(self.artefacts_fitted):
            return nullcontext()
        return erase(self.student, *self._layer_erasers())

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        if self.erasure_specs and bool(self.artefacts_fitted):
            self.log_dict(self.bias_probe(attached_data(self.trainer, self)), sync_dist=False)

    def bias_probe(self, datamodule: SplitData) -> dict[str, float]:
        """Held-out accuracy of a linear probe for the concept at each erased layer, with and
        without the erasers, on the ``val`` split (never used to fit them).

        Returns:
            ``test/bias_probe_acc`` (erased), ``test/bias_probe_acc_unerased`` and
            ``test/bias_probe_chance``; with several layers the keys end in ``/<layer>``.
        """
        loader = torch.utils.data.DataLoader(datamodule.split("val"), batch_size=self.hparams["fit_batch_size"])
        erasers, modes = self._layer_erasers()
        nb = self.hparams["num_bias_groups"]
        out: dict[str, float] = {}
        for spec in self.erasure_specs:
            suffix = f"/{spec.layer}" if len(self.erasure_specs) > 1 else ""
            after = bias_probe_accuracy(self.student, spec.layer, spec.mode, loader, nb, erasers=erasers,
                                        modes=modes, concept=spec.concept)
            before = bias_probe_accuracy(self.student, spec.layer, spec.mode, loader, nb, concept=spec.concept)
            out[f"test/bias_probe_acc{suffix}"] = after["acc"]
            out[f"test/bias_probe_acc_unerased{suffix}"] = before["acc"]
            out[f"test/bias_probe_chance{suffix}"] = after["chance"]
        return out
