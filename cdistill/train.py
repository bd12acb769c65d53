"""Hydra entry point: build data, model, callbacks, loggers and trainer from the config; fit;
test; write ``metrics.json`` in the run directory.

``python train.py experiment=color_mnist/baseline`` or the ``cdistill-train`` console script.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from cdistill.errors import CdistillError
from cdistill.students import check_input_channels

log = logging.getLogger(__name__)
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


def _test_ckpt(trainer: pl.Trainer, which: str) -> str | None:
    """The checkpoint the test stage uses, or None for the weights in memory."""
    ckpt = trainer.checkpoint_callback
    if which not in {"best", "last"}:
        raise CdistillError(f"test_ckpt={which!r}: use 'best' or 'last'.")
    if isinstance(ckpt, ModelCheckpoint):
        path = ckpt.best_model_path if which == "best" else ckpt.last_model_path
        if path:
            return path
    return None


def _as_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, torch.Tensor | float | int)}


@rank_zero_only
def _report(metrics: dict[str, float], output_dir: str) -> None:
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    splits = sorted({k.split("/")[0] for k in metrics if "/" in k and not k.startswith("train")})
    lines = ["", f"{'split':<22}{'acc':>8}{'aligned':>10}{'conflict':>10}"]
    for split in splits:
        row = [metrics.get(f"{split}/{m}") for m in ("acc", "acc_aligned", "acc_conflicting")]
        cells = "".join(f"{'-' if v is None else f'{100 * v:.2f}':>{w}}" for v, w in zip(row, (8, 10, 10), strict=True))
        lines.append(f"{split:<22}{cells}")
    if "train/acc" in metrics:
        lines.append(f"{'train (last epoch)':<22}{100 * metrics['train/acc']:>8.2f}")
    log.info("\n".join(lines) + f"\nmetrics written to {output_dir}/metrics.json")


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training (and test) job described by ``cfg``; return the final metrics."""
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    check_input_channels(model.student, datamodule.num_channels, cfg.model.student.name)
    model.run_config = OmegaConf.to_yaml(cfg, resolve=True)

    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    output_dir = cfg.paths.output_dir
    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir)
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        metrics.update(_as_floats(trainer.callback_metrics))
    if cfg.get("test", True):
        ckpt = _test_ckpt(trainer, cfg.get("test_ckpt", "best")) if cfg.get("train", True) else None
        if ckpt:
            log.info(f"testing {cfg.get('test_ckpt', 'best')} checkpoint {ckpt}")
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True, verbose=False)
        metrics.update(_as_floats(trainer.callback_metrics))
    _report(metrics, output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Console entry point; returns ``optimized_metric`` for Hydra sweepers."""
    metrics = train(cfg)
    name = cfg.get("optimized_metric")
    return metrics.get(name) if name else None


if __name__ == "__main__":
    main()
