"""LightningModule for plain supervised training, with accuracy per split and per bias group.

Everything the module is built from is plain data (the student's keyword arguments and the
optimizer's ``_target_`` config), so checkpoints load with ``torch.load(weights_only=True)`` and
``ClassifierModule.load_from_checkpoint(path)`` rebuilds the model without a Hydra config.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from typing import Any

import hydra.utils
import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from cdistill.errors import CdistillError, NonFiniteError
from cdistill.models.students import create_student
from cdistill.tasks.metrics import BiasGroupAccuracy

Batch = Mapping[str, torch.Tensor]
log = logging.getLogger(__name__)
#: What a training batch that meets NaN/Inf does (``model.on_nonfinite``).
NONFINITE_MODES = ("error", "skip")


def check_optimizer(optimizer: Mapping[str, Any]) -> None:
    """Refuse a learning rate that cannot train: ``lr <= 0`` (or NaN) leaves the weights where
    they are, or walks uphill, without any error from torch."""
    lr = optimizer.get("lr")
    if isinstance(lr, int | float) and not lr > 0:
        raise CdistillError(f"model.optimizer.lr={lr}: the learning rate must be > 0 (e.g. model.optimizer.lr=1e-3).")


def check_nonfinite_mode(mode: str) -> None:
    """Refuse an unknown ``model.on_nonfinite``."""
    if mode not in NONFINITE_MODES:
        raise CdistillError(f"model.on_nonfinite={mode!r}: use one of {NONFINITE_MODES}.")


def fit_hparams(
    student: Mapping[str, Any], optimizer: Mapping[str, Any], scheduler: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What every task module trains its student with, as the first hyperparameters it saves:
    ``student`` (keyword arguments of the student's factory), ``optimizer`` and the optional
    ``scheduler`` (Hydra-style ``_target_`` configs), as plain dicts (checkpoints stay loadable
    with ``weights_only=True``), the learning rate checked (:func:`check_optimizer`)."""
    student, optimizer, scheduler = to_plain(student), to_plain(optimizer), to_plain(scheduler)
    check_optimizer(optimizer)
    return {"student": dict(student), "optimizer": dict(optimizer), "scheduler": None if scheduler is None else dict(scheduler)}


def nonfinite_count(x: torch.Tensor) -> int:
    """Number of NaN/Inf entries of ``x`` (any shape); one device sync."""
    return int((~torch.isfinite(x)).sum()) if x.is_floating_point() else 0


def to_plain(cfg: Any) -> Any:
    """DictConfig/ListConfig -> plain dicts and lists (safe to store in a checkpoint)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_list(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def rng_states() -> dict[str, Any]:
    """The global RNG states (torch CPU and CUDA, numpy, python) as tensors and plain numbers,
    so that a checkpoint holding them loads with ``weights_only=True``."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "state": list(py_state), "gauss": py_gauss},
    }


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_states` returned (CUDA only when the device count matches)."""
    torch.set_rng_state(states["torch"])
    cuda = list(states.get("cuda") or [])
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


class EvalSplitsModule(pl.LightningModule):
    """What every cdistill task module shares: named evaluation splits (adopted from the
    datamodule), the optimizer/scheduler from plain ``_target_`` configs, and checkpoints that
    carry the resolved run config as a plain string (loadable with ``weights_only=True``).

    A subclass sets ``hparams`` ``optimizer``, ``scheduler``, ``val_names``, ``test_names`` and
    ``self.run_config``, and implements :meth:`_build_eval_metrics`, :meth:`_eval_step` and
    :meth:`_eval_epoch_end`.
    """

    run_config: str | None

    def __init__(self) -> None:
        super().__init__()
        # The objective's random draws (random targets, sampled masks) come from this CPU
        # generator rather than the global RNG: its state is in every checkpoint, so a resumed
        # run draws what the uninterrupted one drew. Seeded from the run's seed.
        self.rng = torch.Generator().manual_seed(torch.initial_seed())
        self._global_rng_to_restore: dict[str, Any] | None = None

    def _build_eval_metrics(self, names: Sequence[str]) -> None:
        raise NotImplementedError

    def _eval_step(self, batch: Batch, names: Sequence[str], idx: int) -> None:
        raise NotImplementedError

    def _eval_epoch_end(self, names: Sequence[str]) -> None:
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        """Adopt the datamodule's split names so that log keys match its dataloaders."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if stage == "fit" and self.on_nonfinite == "skip" and self._trainer is not None and self.trainer.world_size > 1:
            # A rank that skips its backward would leave the others waiting in the all-reduce.
            raise CdistillError(
                "model.on_nonfinite=skip works in one process only (a skipped batch on one rank would "
                "stall the others): use model.on_nonfinite=error with several devices."
            )
        for attr in ("val_names", "test_names"):
            names = getattr(dm, attr, None)
            if names:
                self.hparams[attr] = list(names)
                self._build_eval_metrics(names)

    @property
    def on_nonfinite(self) -> str:
        """``error`` (default) or ``skip``: see :meth:`nonfinite_batch`."""
        return str(self.hparams.get("on_nonfinite", "error"))

    def nonfinite_batch(self, detail: str, batch: Batch, batch_idx: int) -> None:
        """Handle a training batch whose loss (or a gradient in it) is NaN/Inf.

        ``on_nonfinite=error`` raises a :class:`NonFiniteError` naming the step, the split and
        whether the images or the model are at fault; ``skip`` logs a warning and returns
        (the caller returns None from ``training_step``, so Lightning skips the update).
        Lightning's own default is to train on: the loss becomes ``nan`` and checkpoints of
        the ruined weights are written with exit status 0.
        """
        bad = nonfinite_count(batch["image"])
        cause = (
            f"the input images hold {bad} NaN/Inf values: fix the data"
            if bad else "the input images are finite, so the model diverged: lower model.optimizer.lr or the loss weights"
        )
        where = f"training step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx}) of split 'train'"
        if self.on_nonfinite == "skip":
            log.warning("Skipped %s (model.on_nonfinite=skip): %s; %s.", where, detail, cause)
            return
        raise NonFiniteError(
            f"Non-finite values at {where}: {detail}; {cause}. "
            "(model.on_nonfinite=skip skips such batches instead.)"
        )

    def check_eval_batch(self, batch: Batch, split: str, batch_idx: int) -> None:
        """Refuse NaN/Inf in an evaluation batch's images: a reported metric must cover the
        whole split, so such a batch is never skipped."""
        bad = nonfinite_count(batch["image"])
        if bad:
            raise NonFiniteError(
                f"Non-finite values in the images of split {split!r}, batch {batch_idx}: {bad} NaN/Inf "
                "entries. Fix the data of that split."
            )

    def validation_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.check_eval_batch(batch, self.hparams["val_names"][dataloader_idx], batch_idx)
        self._eval_step(batch, self.hparams["val_names"], dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end(self.hparams["val_names"])

    def test_step(self, batch: Batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.check_eval_batch(batch, self.hparams["test_names"][dataloader_idx], batch_idx)
        self._eval_step(batch, self.hparams["test_names"], dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end(self.hparams["test_names"])

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer of ``hparams["optimizer"]`` over every parameter of the module (the
        student's and, in a task that has them, its own, e.g. an adversarial probe's)."""
        opt: torch.optim.Optimizer = hydra.utils.instantiate(self.hparams["optimizer"], params=self.parameters())
        return opt

    def configure_optimizers(self) -> Any:
        check_optimizer(self.hparams["optimizer"])
        opt = self.build_optimizer()
        sched_cfg = self.hparams["scheduler"]
        if not sched_cfg:
            return opt
        sched_cfg = dict(sched_cfg)
        interval = sched_cfg.pop("interval", "epoch")
        sched = hydra.utils.instantiate(sched_cfg, optimizer=opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": interval}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain strings, numbers and tensors only: the checkpoint stays loadable with weights_only=True.
        import cdistill

        checkpoint["cdistill"] = {
            "version": cdistill.__version__, "config": self.run_config,
            "rng": {"module": self.rng.get_state(), **rng_states()},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("cdistill", {}).get("rng")
        if saved is None:  # written before RNG states were saved
            return
        self.rng.set_state(saved["module"])
        # The global RNGs are restored when training starts, after the sanity check (which the
        # uninterrupted run did not repeat at this point) has drawn from them.
        self._global_rng_to_restore = saved

    def on_train_start(self) -> None:
        if self._global_rng_to_restore is not None:
            set_rng_states(self._global_rng_to_restore)
            self._global_rng_to_restore = None


class ClassifierModule(EvalSplitsModule):
    """Train a student classifier with cross-entropy and report bias-aware metrics.

    Logs ``train/loss``, ``train/acc`` and, for every evaluation split the datamodule names
    (``val``, ``val_reversed``, ``test``, ``test_random_color`` ...), ``<split>/loss``,
    ``<split>/acc``, ``<split>/acc_aligned``, ``<split>/acc_conflicting``,
    ``<split>/acc_bias<k>``, and over the ``(label, bias)`` groups ``<split>/acc_worst_group``
    and ``<split>/acc_group_mean`` (samples with bias -1 count in no group). The validation
    splits pooled give ``val_all/acc_worst_group`` and ``val_all/acc_group_mean``: on the MNIST
    families ``val`` holds only the bias-aligned groups and ``val_reversed`` only conflicting
    ones, so worst-group validation selection (``protocols.worst=val_all/acc_worst_group``)
    needs both. Where ``val_reversed`` is a subset of ``val`` (BFFHQ, the faces proxy) every
    group's samples are counted twice or once throughout, so its accuracy is unchanged.

    Args:
        student: Keyword arguments of :func:`cdistill.models.students.create_student` (``name`` ...).
        optimizer: Hydra-style config with ``_target_`` (e.g. ``torch.optim.Adam``) and kwargs;
            ``params`` is filled in.
        scheduler: Optional Hydra-style LR scheduler config; ``optimizer`` is filled in.
        num_classes: Number of classes.
        num_bias_groups: Number of values of the bias attribute.
        val_names: Names of the validation dataloaders, in order (overridden by the
            datamodule's ``val_names`` when it has them).
        test_names: Names of the test dataloaders, in order (likewise).
        on_nonfinite: A training batch with a NaN/Inf loss: ``error`` stops the run naming the
            step (default), ``skip`` skips its update with a warning (one process only).
    """

    def __init__(
        self,
        student: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        num_classes: int = 10,
        num_bias_groups: int = 10,
        val_names: Sequence[str] = ("val", "val_reversed"),
        test_names: Sequence[str] = ("test",),
        on_nonfinite: str = "error",
    ) -> None:
        super().__init__()
        fit = fit_hparams(student, optimizer, scheduler)
        check_nonfinite_mode(on_nonfinite)
        self.save_hyperparameters(
            {
                **fit,
                "num_classes": num_classes,
                "num_bias_groups": num_bias_groups,
                "val_names": list(val_names),
                "test_names": list(test_names),
                "on_nonfinite": on_nonfinite,
            }
        )
        self.student = create_student(**fit["student"])
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.eval_metrics = nn.ModuleDict()
        self._build_eval_metrics([*val_names, *test_names])
        # Every validation split's groups together (non-persistent states: checkpoints unchanged).
        self.val_all_groups = BiasGroupAccuracy(num_bias_groups, num_classes)
        self.run_config: str | None = None  # the resolved Hydra config, stored in checkpoints

    def _build_eval_metrics(self, names: Sequence[str]) -> None:
        for name in names:
            if name not in self.eval_metrics:
                self.eval_metrics[name] = MetricCollection(
                    {
                        "acc": MulticlassAccuracy(num_classes=self.hparams["num_classes"], average="micro"),
                        "groups": BiasGroupAccuracy(self.hparams["num_bias_groups"], self.hparams["num_classes"]),
                        "loss": MeanMetric(),
                    },
                    compute_groups=False,
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` for images ``[B, C, H, W]``."""
        return self.student(x)

    def compute_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The training objective as a dict: ``loss`` (what is optimised), each named term, and
        ``logits`` (an output, not a term). Callable without a Trainer."""
        logits = self(batch["image"])
        task = F.cross_entropy(logits, batch["label"])
        return {"loss": task, "task": task, "logits": logits}

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor | None:
        try:
            out = self.compute_losses(batch)
        except NonFiniteError as err:  # e.g. NaN gradients in the concept loss
            self.nonfinite_batch(str(err), batch, batch_idx)
            return None  # skip: no update from this batch
        if not bool(torch.isfinite(out["loss"].detach())):  # one sync per step
            terms = ", ".join(f"{k}={float(v.detach()):g}" for k, v in out.items() if k != "logits" and v.numel() == 1)
            self.nonfinite_batch(f"the loss is not finite ({terms})", batch, batch_idx)
            return None
        bs = batch["label"].shape[0]
        for key, value in out.items():
            if key != "logits":
                # The progress bar shows the objective and the accuracy, not every term.
                self.log(f"train/{key}", value.detach(), on_step=True, on_epoch=True, batch_size=bs,
                         prog_bar=key == "loss")
        self.train_acc(out["logits"].detach().argmax(1), batch["label"])
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=bs, prog_bar=True)
        return out["loss"]

    def _metrics(self, name: str) -> MetricCollection:
        metrics = self.eval_metrics[name]
        assert isinstance(metrics, MetricCollection)
        return metrics

    def _eval_step(self, batch: Batch, names: Sequence[str], dataloader_idx: int) -> None:
        metrics = self._metrics(names[dataloader_idx])
        logits = self(batch["image"])
        loss = F.cross_entropy(logits, batch["label"], reduction="none")
        preds = logits.argmax(1)
        metrics["acc"].update(preds, batch["label"])
        metrics["groups"].update(preds, batch["label"], batch["bias"])
        metrics["loss"].update(loss)
        if list(names) == list(self.hparams["val_names"]):
            self.val_all_groups.update(preds, batch["label"], batch["bias"])

    def _eval_epoch_end(self, names: Sequence[str]) -> None:
        for name in names:
            metrics = self._metrics(name)
            if not metrics["acc"].update_called:
                continue
            values = {"acc": metrics["acc"].compute(), "loss": metrics["loss"].compute()}
            values.update(metrics["groups"].compute())
            self.log_dict({f"{name}/{k}": v for k, v in values.items()}, sync_dist=False)
            metrics.reset()
        pooled = self.val_all_groups
        if list(names) == list(self.hparams["val_names"]) and pooled.update_called:
            values = pooled.compute()
            self.log_dict({f"val_all/{k}": values[k] for k in ("acc_worst_group", "acc_group_mean") if k in values},
                          sync_dist=False)
            pooled.reset()
