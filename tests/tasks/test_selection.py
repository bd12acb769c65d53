"""Model selection and what the test stage reports: every protocol tests its own checkpoint,
``metrics.json``/``selection.json`` say which epoch and file, and the loggers receive labelled
keys once."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, open_dict

import cdistill.tasks.classifier
from cdistill.cli.train import instantiate, train
from cdistill.tasks.classifier import ClassifierModule

MakeCfg = Callable[..., DictConfig]
# Validation "metrics" per epoch that force the selections: `first` peaks at epoch 0, `middle`
# at epoch 1 (of 3), so the strict protocol's best epoch precedes the paper protocol's and
# neither is the last epoch.
SCHEDULE = {"val/sched_first": (1.0, 0.0, 0.0), "val/sched_middle": (0.0, 1.0, 0.0)}
EPOCHS = 3


class ScheduledClassifier(ClassifierModule):
    """A real classifier that also logs the scheduled validation values of :data:`SCHEDULE`."""

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        epoch = min(self.current_epoch, EPOCHS - 1)
        self.log_dict({k: v[epoch] for k, v in SCHEDULE.items()})


@pytest.fixture
def scheduled(monkeypatch: pytest.MonkeyPatch) -> str:
    """``_target_`` of :class:`ScheduledClassifier` (importable through cdistill.tasks.classifier)."""
    monkeypatch.setattr(cdistill.tasks.classifier, "ScheduledClassifier", ScheduledClassifier, raising=False)
    return "cdistill.tasks.classifier.ScheduledClassifier"


def _scheduled_cfg(make_cfg: MakeCfg, target: str, out: Path, *extra: str) -> DictConfig:
    cfg = make_cfg(
        "experiment=color_mnist/baseline", "data.max_train_samples=192", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=2", f"trainer.max_epochs={EPOCHS}", "protocols.strict=val/sched_first",
        "protocols.paper=val/sched_middle", *extra,
    )
    with open_dict(cfg):
        cfg.model._target_ = target
        cfg.paths.output_dir = str(out)
    return cfg


def _fresh_test(cfg: DictConfig, model: ClassifierModule) -> dict[str, float]:
    """Test ``model`` in a new Trainer on the run's data (nothing shared with the run)."""
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_test_batches=2, deterministic=True)
    trainer.test(model, datamodule=instantiate(cfg.data), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def _fresh_model(file: str | None, out: Path) -> ClassifierModule:
    """The protocol's own weights: its checkpoint file, or (no file: the last epoch) student.pt."""
    if file is not None:
        return ClassifierModule.load_from_checkpoint(file, weights_only=True)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    model = ClassifierModule(**{k: ckpt["hyper_parameters"][k] for k in ("student", "optimizer")})
    model.student.load_state_dict(torch.load(out / "student.pt", weights_only=True))
    return model


def test_each_protocol_tests_its_own_checkpoint(make_cfg: MakeCfg, scheduled: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    cfg = _scheduled_cfg(make_cfg, scheduled, out)
    metrics = train(cfg)
    # Each protocol's own weights: the file its selector wrote, or the last epoch's.
    own = {"strict": out / "checkpoints" / "strict" / "best.ckpt", "paper": out / "checkpoints" / "paper" / "best.ckpt",
           "last": None}
    for protocol, file in own.items():
        fresh = _fresh_test(cfg, _fresh_model(None if file is None else str(file), out))
        for key in ("test/acc", "test/loss", "test_random_color/acc"):
            assert metrics[f"{protocol}/{key}"] == pytest.approx(fresh[key], abs=1e-6), (protocol, key)
    assert metrics["test/loss"] == metrics["strict/test/loss"]
    # Epoch 1's weights are not the last epoch's (else the check above proves nothing).
    assert metrics["paper/test/loss"] != pytest.approx(metrics["last/test/loss"], abs=1e-6)
    # metrics.json and selection.json say which epoch and file each protocol tested.
    expected_epochs = {"strict": 0, "paper": 1, "last": EPOCHS - 1}
    assert {p: metrics[f"{p}/selected_epoch"] for p in expected_epochs} == expected_epochs
    selection = json.loads((out / "selection.json").read_text())
    assert {p: s["epoch"] for p, s in selection.items()} == expected_epochs
    assert {p: s["file"] for p, s in selection.items()} == {p: f and str(f) for p, f in own.items()}
    for protocol in ("strict", "paper"):
        assert torch.load(selection[protocol]["file"], weights_only=True)["epoch"] == expected_epochs[protocol]
    assert selection["paper"]["score"] == 1.0 and selection["paper"]["monitor"] == "val/sched_middle"


def test_selection_without_training_tests_weights_in_memory(make_cfg: MakeCfg, tmp_path: Path) -> None:
    cfg = make_cfg("debug=fdr", "train=false")
    metrics = train(cfg)
    selection = json.loads((Path(cfg.paths.output_dir) / "selection.json").read_text())
    assert list(selection) == ["strict", "paper", "last"]
    assert all(s["file"] is None and s["epoch"] is None for s in selection.values())
    assert "strict/selected_epoch" not in metrics and "strict/test/acc" in metrics
    assert all(isinstance(v, float) for v in metrics.values())  # metrics.json stays numeric


def _csv_rows(out: Path) -> list[dict[str, str]]:
    (path,) = out.glob("csv/version_*/metrics.csv")
    with path.open() as f:
        return list(csv.DictReader(f))


def _logged(rows: Sequence[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


def test_loggers_receive_labelled_test_keys_once(make_cfg: MakeCfg, scheduled: str, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    metrics = train(_scheduled_cfg(make_cfg, scheduled, out, "logger=many"))
    rows = _csv_rows(out)
    for protocol in ("strict", "paper", "last"):
        assert _logged(rows, f"{protocol}/test/acc") == [pytest.approx(metrics[f"{protocol}/test/acc"])]
        assert _logged(rows, f"{protocol}/selected_epoch") == [metrics[f"{protocol}/selected_epoch"]]
    # The unprefixed keys once, and they are the first protocol's (strict).
    assert _logged(rows, "test/loss") == [pytest.approx(metrics["strict/test/loss"])]
    tags: dict[str, Any] = {}
    for events in out.glob("tensorboard/version_*/events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    assert tags["paper/test/acc"] == [pytest.approx(metrics["paper/test/acc"])]
    assert tags["test/acc"] == [pytest.approx(metrics["strict/test/acc"])]


def test_progress_bar_shows_train_loss_and_acc(make_cfg: MakeCfg) -> None:
    cfg = make_cfg("debug=fdr")
    trainer = pl.Trainer(fast_dev_run=True, logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(instantiate(cfg.model), datamodule=instantiate(cfg.data))
    shown = set(trainer.progress_bar_metrics)
    assert "train/acc" in shown and {"train/loss_step", "train/loss_epoch"} & shown
