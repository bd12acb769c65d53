"""Hydra entry point: build data, model, callbacks, loggers and trainer from the config; fit;
test; write ``metrics.json`` (numbers) and ``selection.json`` (which epoch and checkpoint each
model-selection protocol tested) in the run directory.

``python train.py experiment=color_mnist/baseline`` or the ``cdistill-train`` console script.
The model-selection protocols are :mod:`cdistill.cli.selection`, the closing files and table
:mod:`cdistill.cli.run_report`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities import rank_zero_only

from cdistill.cli.entry import CONF_DIR, hydra_entry
from cdistill.cli.run_report import SELECTION_FILE, write_run_report
from cdistill.cli.selection import (
    Selection,
    as_floats,
    capture_selections,
    last_epoch,
    protocol_checkpoints,
    protocol_metric,
    run_protocol_tests,
)
from cdistill.concepts.layer_choice import CHOICE_FILE, LayerChoice, config_layer
from cdistill.erasure.saved import ERASERS_FILE, erasers_payload
from cdistill.errors import CdistillError
from cdistill.models.students import check_input_channels, check_input_size
from cdistill.tasks.erasing import ErasureMixin
from cdistill.utils.checkpoint_files import check_resume_checkpoint
from cdistill.utils.checkpointing import LastCheckpoint
from cdistill.utils.datamodule import ImageData

#: Names that moved to :mod:`cdistill.cli.selection` / :mod:`cdistill.cli.run_report` stay
#: importable from here.
__all__ = [
    "CONF_DIR",
    "LAYER_CHOICE_FILE",
    "SELECTION_FILE",
    "STUDENT_FILE",
    "Selection",
    "capture_selections",
    "check_trainer_limits",
    "checkpoint_run_dir",
    "instantiate",
    "instantiate_group",
    "last_checkpoint_last",
    "main",
    "protocol_checkpoints",
    "protocol_metric",
    "resolve_ckpt_path",
    "resume_in_run_dir",
    "train",
    "with_auto_layer",
]

log = logging.getLogger(__name__)
STUDENT_FILE = "student.pt"
#: ``model.layer=auto``: the chosen layer and the CAV scan behind it (:mod:`cdistill.concepts.layer_choice`).
LAYER_CHOICE_FILE = CHOICE_FILE


def instantiate(cfg: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that lets cdistill's own errors through unwrapped, so the
    user reads what is wrong and how to fix it rather than Hydra's wrapper."""
    try:
        return hydra.utils.instantiate(cfg, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, CdistillError):
            raise cause from None
        raise


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` in a group config (callbacks, loggers)."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if isinstance(c, DictConfig) and "_target_" in c]


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str, runs_dir: str | None = None) -> str | None:
    """Resolve the ``ckpt_path`` option and check that the file exists.

    Args:
        ckpt_path: A checkpoint file, ``last`` (``<output_dir>/checkpoints/last.ckpt`` when it
            exists, e.g. with ``hydra.run.dir`` set to the run's folder; else the most recently
            written ``<runs_dir>/*/checkpoints/last.ckpt``, i.e. this task's latest run), or None.
        output_dir: This run's directory.
        runs_dir: Folder of this task's run directories (``<log_dir>/<task_name>/runs``).
    """
    if not ckpt_path:
        return None
    path = Path(ckpt_path)
    if ckpt_path == "last":
        path = Path(output_dir) / "checkpoints" / "last.ckpt"
        latest = sorted(Path(runs_dir).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime) if runs_dir else []
        if not path.is_file() and latest:
            path = latest[-1]
    if not path.is_file():
        raise CdistillError(
            f"Checkpoint to resume from {str(path)!r} does not exist. Fix ckpt_path=<file> "
            "(a checkpoints/last.ckpt of an earlier run) or set ckpt_path=null to start afresh."
        )
    return str(path)


def check_trainer_limits(trainer: Mapping[str, Any]) -> None:
    """Refuse a trainer config that never stops: ``max_epochs=-1`` means "no epoch limit" to
    Lightning, so without ``max_steps`` or ``max_time`` the run trains forever."""
    if trainer.get("fast_dev_run"):
        return
    endless_steps = trainer.get("max_steps") in (None, -1)
    if trainer.get("max_epochs") == -1 and endless_steps and not trainer.get("max_time"):
        raise CdistillError(
            "trainer.max_epochs=-1 with no trainer.max_steps and no trainer.max_time trains forever. "
            "Set trainer.max_epochs=<N>, or keep -1 and add +trainer.max_time=DD:HH:MM:SS or +trainer.max_steps=<N>."
        )


def checkpoint_run_dir(ckpt_path: str) -> Path | None:
    """The run directory a checkpoint belongs to: the parent of the ``checkpoints`` folder that
    holds it (``<run>/checkpoints/last.ckpt`` or ``<run>/checkpoints/<protocol>/best.ckpt``),
    or None for a file elsewhere."""
    for folder in Path(ckpt_path).resolve().parents[:2]:
        if folder.name == "checkpoints":
            return folder.parent
    return None


def resume_in_run_dir(cfg: DictConfig) -> str | None:
    """Resolve ``cfg.ckpt_path``; when it lies in a run's ``checkpoints/``, continue that run.

    Resume semantic: ``cfg.paths.output_dir`` becomes that run's directory, so the checkpoint
    callbacks (``last.ckpt``, the monitored one, each protocol's selector) find their own
    folders and keep their state (best epochs so far), files are overwritten rather than
    versioned (no ``best-v1.ckpt``), and ``metrics.json``/``student.pt`` land beside the
    checkpoints. Loggers add a new version folder there. This invocation's Hydra folder keeps
    only its config and log. A checkpoint outside a run's ``checkpoints/`` resumes into this
    run's directory, with the selectors starting afresh.

    Returns:
        The checkpoint path, or None to start afresh.
    """
    runs_dir = str(Path(cfg.paths.log_dir) / str(cfg.get("task_name", "train")) / "runs") if "log_dir" in cfg.paths else None
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), cfg.paths.output_dir, runs_dir)
    run_dir = checkpoint_run_dir(ckpt_path) if ckpt_path else None
    if run_dir is not None and run_dir != Path(cfg.paths.output_dir).resolve():
        log.info("resuming from %s: continuing in its run directory %s", ckpt_path, run_dir)
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
    return ckpt_path


def last_checkpoint_last(callbacks: list[Any]) -> list[Any]:
    """``callbacks`` with every :class:`LastCheckpoint` moved to the end (stable otherwise):
    Lightning runs checkpoint callbacks in list order, and ``last.ckpt`` must store the other
    callbacks' states (e.g. the protocol selectors') after they have seen the epoch."""
    return sorted(callbacks, key=lambda cb: isinstance(cb, LastCheckpoint))


@rank_zero_only
def _save_student(model: pl.LightningModule, output_dir: str) -> None:
    """The student's weights at the end of training, as a plain state dict: what
    ``model.student.checkpoint_path`` takes (and what the pipeline fine-tunes from)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    student = getattr(model, "student", model)
    torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, Path(output_dir) / STUDENT_FILE)
    # An erasing run's model is the student *with* its erasers: they go beside it, so that
    # loading student.pt to measure it loads them too (cdistill.erasure.saved).
    if isinstance(model, ErasureMixin) and model.erasure_specs and bool(model.artefacts_fitted):
        erasers, modes = model._layer_erasers()
        torch.save(erasers_payload(erasers, modes), Path(output_dir) / ERASERS_FILE)


@rank_zero_only
def _write_layer_choice(choice: LayerChoice, output_dir: str) -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / LAYER_CHOICE_FILE).write_text(json.dumps(choice.to_dict(), indent=2))


def with_auto_layer(cfg: DictConfig, datamodule: ImageData) -> DictConfig:
    """``cfg`` with ``model.layer=auto`` replaced by the layer the CAV scan of the model training
    starts from chooses (:mod:`cdistill.concepts.layer_choice`), written to ``layer_choice.json``
    in the run directory; ``cfg`` itself when there is nothing to choose."""
    if "layer" not in cfg.model:
        return cfg
    choice = config_layer(cfg.model, datamodule)
    if choice is None:
        return cfg
    out = cfg.copy()
    with open_dict(out):
        out.model.layer = choice.layer
    _write_layer_choice(choice, str(cfg.paths.output_dir))
    return out


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training (and test) job described by ``cfg``; return the final metrics."""
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = resume_in_run_dir(cfg) if cfg.get("train", True) else None
    datamodule = instantiate(cfg.data)
    if cfg.get("train", True):
        cfg = with_auto_layer(cfg, datamodule)
    model = instantiate(cfg.model)
    check_input_channels(model.student, datamodule.num_channels, cfg.model.student.name)
    if isinstance(getattr(model.student, "image_size", None), int):  # a student with a fixed input side
        check_input_size(model.student, int(datamodule.image_size), cfg.model.student.name)
    model.run_config = OmegaConf.to_yaml(cfg, resolve=True)

    check_trainer_limits(cfg.trainer)
    callbacks = instantiate_group(cfg.get("callbacks"))
    protocols: dict[str, Any] = dict(cfg.get("protocols") or {})
    selectors = protocol_checkpoints(protocols, cfg.paths.output_dir, callbacks) if cfg.get("train", True) else {}
    callbacks = last_checkpoint_last(callbacks)
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    output_dir = cfg.paths.output_dir
    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        if ckpt_path:
            check_resume_checkpoint(ckpt_path, model, cfg.model.student.get("name"))
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics.update(as_floats(trainer.callback_metrics))
        metrics.update(getattr(model, "artefact_metrics", {}))  # e.g. CAV accuracies in both spaces
        _save_student(model, output_dir)
    selections: dict[str, Selection] = {}
    if cfg.get("test", True):
        # Every protocol's selection is fixed before the first test touches the model.
        selections = capture_selections(protocols, selectors, last_epoch(trainer, cfg.get("train", True)))
        metrics.update(run_protocol_tests(trainer, model, datamodule, selections))
    write_run_report(metrics, output_dir, protocols, selections)
    return metrics


def _sweep_objective(cfg: DictConfig) -> float | None:
    """Train; return ``optimized_metric`` for Hydra sweepers."""
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


main = hydra_entry(
    _sweep_objective, "Console entry point; returns ``optimized_metric`` for Hydra sweepers.", objective=True
)


if __name__ == "__main__":
    main()
