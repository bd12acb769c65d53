"""Shared fixtures: compose the real Hydra config and shrink it for fast CPU tests."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

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
