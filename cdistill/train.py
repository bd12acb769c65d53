"""Hydra entry point: build data, model, callbacks, loggers and trainer from the config; fit;
test; write ``metrics.json`` in the run directory.

``python train.py experiment=color_mnist/baseline`` or the ``cdistill-train`` console script.
"""

from __future__ import annotations

import copy
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
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from cdistill.checkpointing import LastCheckpoint
from cdistill.errors import CdistillError
from cdistill.students import check_input_channels

log = logging.getLogger(__name__)
STUDENT_FILE = "student.pt"
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


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


def protocol_metric(name: str, spec: Any) -> tuple[str | None, str]:
    """``(metric, mode)`` of a protocol: a metric name (maximised), a mapping ``{monitor,
    mode}`` (``mode`` ``max`` or ``min``, e.g. an error to minimise), or None (last epoch)."""
    if not spec:
        return None, "max"
    if isinstance(spec, str):
        return spec, "max"
    metric, mode = spec.get("monitor"), str(spec.get("mode", "max"))
    if not metric or mode not in ("max", "min"):
        raise CdistillError(
            f"protocols.{name}={dict(spec)}: give a metric name, or {{monitor: <metric>, mode: max|min}}."
        )
    return str(metric), mode


def protocol_checkpoints(
    protocols: Mapping[str, Any], output_dir: str, callbacks: list[Any]
) -> dict[str, ModelCheckpoint]:
    """The checkpoint callback of each model-selection protocol that monitors a metric.

    A configured ``ModelCheckpoint`` that already keeps the best epoch by that metric is
    reused; otherwise one is added to ``callbacks`` (writing ``checkpoints/<protocol>/``).

    Args:
        protocols: Protocol name -> monitored metric (maximised), ``{monitor, mode}``, or
            None for the last epoch (see :func:`protocol_metric`).
        output_dir: Run directory.
        callbacks: The configured callbacks; new ones are appended.
    """
    selectors: dict[str, ModelCheckpoint] = {}
    for name, spec in protocols.items():
        metric, mode = protocol_metric(name, spec)
        if not metric:
            continue
        existing = [
            cb for cb in callbacks
            if isinstance(cb, ModelCheckpoint) and cb.monitor == metric and cb.mode == mode and cb.save_top_k != 0
        ]
        if existing:
            selectors[name] = existing[0]
            continue
        selectors[name] = ModelCheckpoint(
            dirpath=str(Path(output_dir) / "checkpoints" / name), filename="best",
            monitor=metric, mode=mode, save_top_k=1, save_last=False, auto_insert_metric_name=False,
        )
        callbacks.append(selectors[name])
    return selectors


def _as_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, torch.Tensor | float | int)}


@rank_zero_only
def _save_student(model: pl.LightningModule, output_dir: str) -> None:
    """The student's weights at the end of training, as a plain state dict: what
    ``model.student.checkpoint_path`` takes (and what the pipeline fine-tunes from)."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    student = getattr(model, "student", model)
    torch.save({k: v.detach().cpu() for k, v in student.state_dict().items()}, Path(output_dir) / STUDENT_FILE)


@rank_zero_only
def _report(metrics: dict[str, float], output_dir: str, protocols: Mapping[str, Any]) -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    prefixes = set(protocols) | {"train"}
    # Evaluation splits: those with an accuracy (classification) or a reflectance error (IID).
    splits = sorted({k.split("/")[0] for k in metrics if k.count("/") == 1 and k.endswith(("/acc", "/r_mse"))} - prefixes)
    iid = [s for s in splits if f"{s}/r_mse" in metrics]  # decomposition runs: errors, not accuracies
    lines: list[str] = []
    classified = [s for s in splits if s not in iid]
    if classified:
        lines += ["", f"{'split':<22}{'acc':>8}{'aligned':>10}{'conflict':>10}"]
    for split in classified:
        row = [metrics.get(f"{split}/{m}") for m in ("acc", "acc_aligned", "acc_conflicting")]
        cells = "".join(f"{'-' if v is None else f'{100 * v:.2f}':>{w}}" for v, w in zip(row, (8, 10, 10), strict=True))
        lines.append(f"{split:<22}{cells}")
    if iid:
        lines += ["", f"{'split':<22}{'R si-MSE':>10}{'S si-MSE':>10}"]
        lines += [f"{s:<22}{metrics[f'{s}/r_mse']:>10.5f}{metrics.get(f'{s}/s_mse', float('nan')):>10.5f}" for s in iid]
    if "train/acc" in metrics:
        lines.append(f"{'train (last epoch)':<22}{100 * metrics['train/acc']:>8.2f}")
    by_protocol = [f"{p} {100 * metrics[f'{p}/test/acc']:.2f}" for p in protocols if f"{p}/test/acc" in metrics]
    if by_protocol:
        lines.append("test acc by model-selection protocol: " + ", ".join(by_protocol))
    log.info("\n".join(lines) + f"\nmetrics written to {output_dir}/metrics.json")


def _test(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    protocols: Mapping[str, Any],
    selectors: Mapping[str, ModelCheckpoint],
) -> dict[str, float]:
    """Test once per protocol: ``<protocol>/<split>/<metric>``; unprefixed keys = the first.

    A protocol without a checkpoint (metric None, fast_dev_run, no training) tests the weights
    in memory, i.e. the last epoch's.
    """
    out: dict[str, float] = {}
    # Testing a checkpoint loads its weights into the model: keep the last epoch's to restore.
    last_state = copy.deepcopy(model.state_dict())
    for i, name in enumerate(protocols or {"last": None}):
        selector = selectors.get(name)
        ckpt = selector.best_model_path if selector is not None and selector.best_model_path else None
        if ckpt is None:
            model.load_state_dict(last_state)
        log.info(f"test ({name} protocol): {ckpt or 'weights in memory (last epoch)'}")
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True, verbose=False)
        tested = {k: v for k, v in _as_floats(trainer.callback_metrics).items() if k.startswith("test")}
        out.update({f"{name}/{k}": v for k, v in tested.items()})
        if i == 0:
            out.update(tested)
    return out


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training (and test) job described by ``cfg``; return the final metrics."""
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    ckpt_path = resume_in_run_dir(cfg) if cfg.get("train", True) else None
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    check_input_channels(model.student, datamodule.num_channels, cfg.model.student.name)
    model.run_config = OmegaConf.to_yaml(cfg, resolve=True)

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
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics.update(_as_floats(trainer.callback_metrics))
        metrics.update(getattr(model, "artefact_metrics", {}))  # e.g. CAV accuracies in both spaces
        _save_student(model, output_dir)
    if cfg.get("test", True):
        metrics.update(_test(trainer, model, datamodule, protocols, selectors))
    _report(metrics, output_dir, protocols)
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry point; returns ``optimized_metric`` for Hydra sweepers."""
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
