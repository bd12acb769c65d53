"""TeacherConfig: the typed ``model.teacher`` (cdistill.teacher.config), its checks and its round
trip through plain dicts; the teacher stage accepts it or the dict older checkpoints hold."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

import cdistill.teacher.stage as stage_mod
from cdistill.errors import CdistillError
from cdistill.teacher.config import CAV_SPACES, TeacherConfig
from cdistill.teacher.feature_cache import DEFAULT_MAX_BYTES

ROOT = Path(__file__).resolve().parents[2]


def _shipped(name: str) -> dict[str, Any]:
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "teacher" / f"{name}.yaml"), resolve=False)
    assert isinstance(cfg, dict)
    return {str(k): v for k, v in cfg.items()}


def test_shipped_teacher_round_trips_through_plain_dicts() -> None:
    cfg = TeacherConfig.from_dict(_shipped("digits_ae"))
    assert (cfg.name, cfg.layer, cfg.pca_dims, cfg.cav_space) == ("cdistill:digits_ae", "encoder.conv2", 32, "teacher")
    assert cfg.mapping["epochs"] == 200 and cfg.train is not None and cfg.train["width"] == 32
    plain = cfg.to_dict()
    buf = io.BytesIO()
    torch.save(plain, buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == plain
    assert TeacherConfig.from_dict(plain) == cfg


def test_the_cache_cap_default_and_an_explicit_null() -> None:
    assert TeacherConfig.from_dict({"name": "t", "layer": "l"}).cache_max_bytes == DEFAULT_MAX_BYTES
    uncapped = TeacherConfig.from_dict({"name": "t", "layer": "l", "cache_max_bytes": None})
    assert uncapped.cache_max_bytes is None  # null: no cap, not the default
    assert TeacherConfig.from_dict(uncapped.to_dict()).cache_max_bytes is None
    # Other nulls are the default.
    assert TeacherConfig.from_dict({"name": "t", "layer": "l", "pca_dims": None, "cav_space": None}) == \
        TeacherConfig(name="t", layer="l")


def test_only_the_set_teacher_arguments_are_passed_on() -> None:
    cfg = TeacherConfig.from_dict({"name": "t", "layer": "l", "image_size": 28, "in_chans": None, "pca_dims": 4})
    assert cfg.teacher_kwargs() == {"image_size": 28}


@pytest.mark.parametrize(("values", "match"), [
    ({"layer": "l"}, r"model\.teacher\.name is not set"),
    ({"name": "t"}, r"model\.teacher\.layer is not set"),
    ({"name": "t", "layer": "l", "cav_space": "both"}, r"model\.teacher\.cav_space='both'"),
    ({"name": "t", "layer": "l", "cache_max_bytes": -1}, r"cache_max_bytes=-1"),
    ({"name": "t", "layer": "l", "checkpoint_path": "???"}, r"checkpoint_path is not set"),
    ({"name": "t", "layer": "l", "checkpoint_path": "/no/such/file.pt"}, r"does not exist"),
    ({"name": "t", "layer": "l", "pca_dim": 4}, r"key of model\.teacher.*Close names: pca_dims"),
])
def test_bad_teacher_settings_are_named(values: dict[str, Any], match: str) -> None:
    with pytest.raises(CdistillError, match=match):
        TeacherConfig.from_dict(values)


def test_the_stage_takes_the_typed_config_or_a_dict() -> None:
    typed = TeacherConfig(name="t", layer="l", cav_space=CAV_SPACES[1])
    assert stage_mod.check_teacher_config(typed) is typed
    assert stage_mod.check_teacher_config(typed.to_dict()) == typed
