"""TCAV callback and report: logged keys, plot, significance of a real bias."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from cdistill.cli.tcav_report import TCAVCallback, plot_tcav, summary, tcav_table
from cdistill.errors import CdistillError
from cdistill.tasks.classifier import ClassifierModule
from datamodules import ColorMNISTDataModule


def test_callback_logs_scores_and_writes_plot(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = ColorMNISTDataModule(max_train_samples=640, batch_size=64)
    model = ClassifierModule(student={"name": "mnist_cnn"}, optimizer={"_target_": "torch.optim.Adam", "lr": 2e-3})
    cb = TCAVCallback("concepts/color_mnist.yaml", "conv2", ["color_{y}"], output_dir=str(tmp_path))
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[cb],
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(model, datamodule=dm)
    metrics = trainer.callback_metrics
    scores = [float(metrics[f"tcav/color_{k}"]) for k in range(10)]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert (tmp_path / "tcav" / "epoch_000.png").stat().st_size > 1000
    # The model learned colour: moving towards its class colour raises the class logit.
    assert float(metrics["tcav/mean"]) > 0.8
    assert float(metrics["tcav_p/color_0"]) <= 1.0


def test_random_concept_is_not_significant(tmp_path: Path) -> None:
    """A random set posing as the concept: scores near the random baseline, no significance
    after correction for most classes."""
    torch.manual_seed(0)
    dm = ColorMNISTDataModule(max_train_samples=100)
    student = ClassifierModule(student={"name": "mnist_cnn"}, optimizer={"_target_": "torch.optim.Adam"}).student
    scores = tcav_table(student, dm, "concepts/color_mnist.yaml", "conv2", ["random/9"], random="random")
    assert len(scores) == 1
    s = scores[0]
    assert s.p_corrected >= s.p_value
    assert abs(s.score - s.random_score) < 0.35
    assert set(summary(scores)) == {"tcav", "tcav_p", "tcav_significant"}
    assert plot_tcav(scores, tmp_path / "t.png").is_file()


def test_tcav_table_restores_train_mode_when_a_concept_is_missing() -> None:
    # The train/eval mode comes back also when the table raises half-way (a missing concept).
    dm = ColorMNISTDataModule(max_train_samples=100)
    student = ClassifierModule(student={"name": "mnist_cnn"}, optimizer={"_target_": "torch.optim.Adam"}).student
    student.train()
    try:
        tcav_table(student, dm, "concepts/color_mnist.yaml", "conv2", ["no_such_concept"], random="random")
    except CdistillError as err:
        assert "no_such_concept" in str(err)
    else:
        raise AssertionError("a missing concept must raise")
    assert all(m.training for m in student.modules())


def test_callback_names_an_unknown_setting() -> None:
    cb = TCAVCallback("concepts/color_mnist.yaml", "conv2", ["color_{y}"], random="random", correction="bh")
    assert cb.table_kw == {"random": "random", "correction": "bh"}
    with pytest.raises(CdistillError, match="colour"):
        TCAVCallback("concepts/color_mnist.yaml", "conv2", ["color_{y}"], colour="red")
