"""Model-selection protocols (``protocols`` in the config): which weights each one tests.

A protocol selects on a validation metric (its own best-epoch checkpoint,
:func:`protocol_checkpoints`) or takes the last epoch; :func:`capture_selections` fixes every
protocol's weights after training and :func:`run_protocol_tests` tests each in turn
(``<protocol>/<split>/<metric>`` keys). :mod:`cdistill.cli.train` runs them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from cdistill.errors import CdistillError

log = logging.getLogger(__name__)


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


def as_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of ``metrics`` (tensors, floats, ints) as floats."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, torch.Tensor | float | int)}


@dataclass
class Selection:
    """The weights one model-selection protocol tests, captured before any test runs.

    Attributes:
        monitor: Validation metric the protocol selects on (None: the last epoch).
        mode: ``max`` or ``min`` (None without a monitor).
        file: Checkpoint the protocol selected (None: the weights in memory after the last
            epoch, e.g. for ``last``, ``fast_dev_run`` or ``train=false``).
        score: The monitored metric's value at the selected epoch (None without a file).
        epoch: Selected epoch (0-based; None when unknown, e.g. ``train=false``). For a file,
            the epoch stored in it, read when it is loaded for the test.
    """

    monitor: str | None
    mode: str | None
    file: str | None
    score: float | None
    epoch: int | None


def capture_selections(
    protocols: Mapping[str, Any], selectors: Mapping[str, ModelCheckpoint], last_epoch: int | None
) -> dict[str, Selection]:
    """Each protocol's selection as it stands after training, taken before any test (testing a
    checkpoint with ``trainer.test(ckpt_path=...)`` restores every callback's state from it and
    so rewinds the other selectors to that epoch; :func:`run_protocol_tests` loads only the weights).

    Args:
        protocols: Protocol name -> spec (see :func:`protocol_metric`); empty: ``{"last": None}``.
        selectors: Protocol name -> its checkpoint callback (:func:`protocol_checkpoints`).
        last_epoch: Index of the last trained epoch (None when nothing was trained).
    """
    out: dict[str, Selection] = {}
    for name, spec in (protocols or {"last": None}).items():
        metric, mode = protocol_metric(name, spec)
        selector = selectors.get(name)
        file = selector.best_model_path if selector is not None and selector.best_model_path else None
        score = selector.best_model_score if selector is not None and file else None
        if metric and file is None and last_epoch is not None:
            log.warning("protocol %s: no checkpoint selected by %s; testing the last epoch's weights", name, metric)
        score_f = None if score is None else float(score)
        # A file's epoch is read from it when it is loaded for the test.
        out[name] = Selection(metric, mode if metric else None, file, score_f, None if file else last_epoch)
    return out


def _load_selected(model: pl.LightningModule, selection: Selection) -> None:
    """Load the selected checkpoint's weights into ``model`` (only the weights: no callback,
    loop or optimizer state) and record the epoch stored in it."""
    assert selection.file is not None
    ckpt = torch.load(selection.file, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["state_dict"], strict=model.strict_loading)
    selection.epoch = int(ckpt["epoch"])


def _log_to(loggers: list[Any], metrics: Mapping[str, float], step: int) -> None:
    """Log ``metrics`` to every logger at ``step`` and flush them (rank zero does the writing)."""
    for lg in loggers:
        lg.log_metrics(dict(metrics), step=step)
        lg.save()


def run_protocol_tests(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    selections: Mapping[str, Selection],
) -> dict[str, float]:
    """Test each protocol's own selection: ``<protocol>/<split>/<metric>`` and
    ``<protocol>/selected_epoch``; the unprefixed ``<split>/<metric>`` keys are the first
    protocol's. The model is left with the last epoch's weights.

    Lightning's loggers are detached during the tests (each would receive an unlabelled
    ``test/...`` per protocol); the labelled keys are logged once the tests are done.
    """
    out: dict[str, float] = {}
    last_state = copy.deepcopy(model.state_dict())
    loggers = list(trainer.loggers)
    trainer.loggers = []
    try:
        for i, (name, selection) in enumerate(selections.items()):
            if selection.file is None:
                model.load_state_dict(last_state)
            else:
                _load_selected(model, selection)
            log.info(f"test ({name} protocol): {selection.file or 'weights in memory (last epoch)'}, epoch {selection.epoch}")
            trainer.test(model, datamodule=datamodule, verbose=False)
            tested = {k: v for k, v in as_floats(trainer.callback_metrics).items() if k.startswith("test")}
            out.update({f"{name}/{k}": v for k, v in tested.items()})
            if selection.epoch is not None:
                out[f"{name}/selected_epoch"] = float(selection.epoch)
            if i == 0:
                out.update(tested)
    finally:
        trainer.loggers = loggers
        model.load_state_dict(last_state)
    _log_to(loggers, out, trainer.global_step)
    return out


def last_epoch(trainer: pl.Trainer, trained: bool) -> int | None:
    """Index of the last completed training epoch (None when nothing was trained)."""
    return max(trainer.current_epoch - 1, 0) if trained else None
