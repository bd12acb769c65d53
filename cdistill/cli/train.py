"""Hydra entry point: build data, model, callbacks, loggers and trainer from the config; fit;
test; write ``metrics.json`` (numbers) and ``selection.json`` (which epoch and checkpoint each
model-selection protocol tested) in the run directory.

``python train.py experiment=color_mnist/baseline`` or the ``cdistill-train`` console script.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from cdistill.concepts.layer_choice import CHOICE_FILE, LayerChoice, config_layer
from cdistill.errors import CdistillError, exit_on_error
from cdistill.models.students import check_input_channels, check_input_size
from cdistill.utils.checkpoint_files import check_resume_checkpoint
from cdistill.utils.checkpointing import LastCheckpoint
from cdistill.utils.datamodule import ImageData
from cdistill.utils.resolvers import register_resolvers
from cdistill.utils.resources import conf_dir

log = logging.getLogger(__name__)
register_resolvers()  # ${cdistill.run_suffix:} and ${cdistill.launch_dir:} in conf/hydra, conf/paths
#: Per protocol: the file and epoch it tested (``metrics.json`` keeps numbers only).
SELECTION_FILE = "selection.json"
STUDENT_FILE = "student.pt"
#: ``model.layer=auto``: the chosen layer and the CAV scan behind it (:mod:`cdistill.concepts.layer_choice`).
LAYER_CHOICE_FILE = CHOICE_FILE
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
    so rewinds the other selectors to that epoch; :func:`_test` loads only the weights).

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


def _test(
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
            tested = {k: v for k, v in _as_floats(trainer.callback_metrics).items() if k.startswith("test")}
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


def _last_epoch(trainer: pl.Trainer, trained: bool) -> int | None:
    """Index of the last completed training epoch (None when nothing was trained)."""
    return max(trainer.current_epoch - 1, 0) if trained else None


@rank_zero_only
def _report(
    metrics: dict[str, float],
    output_dir: str,
    protocols: Mapping[str, Any],
    selections: Mapping[str, Selection] | None = None,
) -> None:
    """Write ``metrics.json`` (flat, numeric) and ``selection.json`` (per protocol: monitor,
    mode, tested file, score, epoch); print the evaluation table."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    if selections:
        table = {name: asdict(sel) for name, sel in selections.items()}
        (Path(output_dir) / SELECTION_FILE).write_text(json.dumps(table, indent=2))
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
    for name, sel in (selections or {}).items():
        lines.append(f"  {name}: epoch {sel.epoch}, {sel.file or 'weights in memory after the last epoch'}")
    log.info("\n".join(lines) + f"\nmetrics written to {output_dir}/metrics.json")


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
        metrics.update(_as_floats(trainer.callback_metrics))
        metrics.update(getattr(model, "artefact_metrics", {}))  # e.g. CAV accuracies in both spaces
        _save_student(model, output_dir)
    selections: dict[str, Selection] = {}
    if cfg.get("test", True):
        # Every protocol's selection is fixed before the first test touches the model.
        selections = capture_selections(protocols, selectors, _last_epoch(trainer, cfg.get("train", True)))
        metrics.update(_test(trainer, model, datamodule, selections))
    _report(metrics, output_dir, protocols, selections)
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
