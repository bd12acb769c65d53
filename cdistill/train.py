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
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from cdistill.checkpoint_files import check_resume_checkpoint
from cdistill.errors import CdistillError, exit_on_error
from cdistill.resources import conf_dir
from cdistill.students import check_input_channels

log = logging.getLogger(__name__)
STUDENT_FILE = "student.pt"
CONF_DIR = conf_dir()  # the checkout's conf/, or the copy an installed wheel ships


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


def resolve_ckpt_path(ckpt_path: str | None, output_dir: str) -> str | None:
    """Resolve the ``ckpt_path`` option ("last" -> this run's last.ckpt) and check it exists."""
    if not ckpt_path:
        return None
    path = Path(output_dir) / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
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
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    check_input_channels(model.student, datamodule.num_channels, cfg.model.student.name)
    model.run_config = OmegaConf.to_yaml(cfg, resolve=True)

    check_trainer_limits(cfg.trainer)
    callbacks = instantiate_group(cfg.get("callbacks"))
    protocols: dict[str, Any] = dict(cfg.get("protocols") or {})
    selectors = protocol_checkpoints(protocols, cfg.paths.output_dir, callbacks) if cfg.get("train", True) else {}
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    output_dir = cfg.paths.output_dir
    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
        if ckpt_path:
            check_resume_checkpoint(ckpt_path, model, cfg.model.student.get("name"))
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics.update(_as_floats(trainer.callback_metrics))
        metrics.update(getattr(model, "artefact_metrics", {}))  # e.g. CAV accuracies in both spaces
        _save_student(model, output_dir)
    if cfg.get("test", True):
        metrics.update(_test(trainer, model, datamodule, protocols, selectors))
    _report(metrics, output_dir, protocols)
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@exit_on_error
def main(cfg: DictConfig) -> float | None:
    """Console entry point; returns ``optimized_metric`` for Hydra sweepers."""
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
