"""Shared fixtures: compose the real Hydra config and shrink it for fast CPU tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Never touch the network; keep wandb local.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def compose_cfg(overrides: Sequence[str], tmp: Path) -> DictConfig:
    """Compose conf/train.yaml with ``overrides`` and point every path into ``tmp``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp)
        cfg.paths.output_dir = str(tmp / "run")
        cfg.paths.log_dir = str(tmp / "logs")
        cfg.trainer.enable_progress_bar = False
        if "data" in cfg:
            cfg.data.num_workers = 0
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path) -> Iterator[Callable[..., DictConfig]]:
    """``make_cfg(*overrides)`` -> a composed, shrunk config writing under tmp_path."""

    def make(*overrides: str) -> DictConfig:
        return compose_cfg(overrides, tmp_path)

    yield make
    GlobalHydra.instance().clear()


def one_sgd_step_run(tmp: Path, name: str, experiment: str, extra: Sequence[str]) -> dict[str, torch.Tensor]:
    """Run ``train.py`` for one SGD step (lr 1, 64 samples) in a subprocess; return the
    ``state_dict`` of its last checkpoint. Used to compare DDP-sim with one process."""
    common = [
        f"experiment={experiment}", "data.max_train_samples=64", "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1", "test=false",
        "model.optimizer._target_=torch.optim.SGD", "model.optimizer.lr=1.0",
        "trainer.enable_progress_bar=false", "logger=csv", f"hydra.run.dir={tmp / name}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *common, *extra], cwd=tmp, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(tmp / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def small_color_mnist() -> Any:
    """A ColorMNIST datamodule of 300 training digits, set up for fit (one per test module)."""
    from datamodules import ColorMNISTDataModule

    dm = ColorMNISTDataModule(max_train_samples=300)
    dm.setup("fit")
    return dm


def tiny_distill(layer: str, **kw: Any) -> Any:
    """A ConceptDistillModule on the MNIST CNN with Adam (lr 1e-3) and the gradient-direction loss
    off; ``kw`` adds or replaces its arguments."""
    from cdistill.tasks.distill import ConceptDistillModule

    args: dict[str, Any] = {"layer": layer, "lambda_c": 0.0, "student": {"name": "mnist_cnn"},
                            "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3}}
    return ConceptDistillModule(**(args | kw))
