"""Which checkpoint describes a run's weights, and the config it recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from cdistill.errors import CdistillError
from cdistill.utils.checkpoint_files import (
    LAST_CHECKPOINT,
    load_torch_file,
    recorded_config,
    run_checkpoint,
)


def test_run_checkpoint_of_a_student_pt_is_the_last_checkpoint_beside_it(tmp_path: Path) -> None:
    student = tmp_path / "student.pt"
    torch.save({"w": torch.zeros(1)}, student)
    assert run_checkpoint(student) is None  # no checkpoint beside it yet
    last = tmp_path / LAST_CHECKPOINT
    last.parent.mkdir()
    torch.save({"state_dict": {}}, last)
    assert run_checkpoint(student) == last
    other = tmp_path / "checkpoints" / "strict.ckpt"
    torch.save({"state_dict": {}}, other)
    assert run_checkpoint(other) == other  # a checkpoint describes itself


def test_recorded_config_reads_the_stored_yaml(tmp_path: Path) -> None:
    file = tmp_path / "run.ckpt"
    torch.save({"cdistill": {"config": yaml.safe_dump({"seed": 3, "data": {"seed": 3}})}}, file)
    assert recorded_config(load_torch_file(file, "ckpt", "fix")) == {"seed": 3, "data": {"seed": 3}}
    assert recorded_config({"state_dict": {}}) is None
    assert recorded_config({"cdistill": {"config": "just text"}}) is None  # YAML, but not a mapping
    assert recorded_config([1, 2]) is None


def test_load_torch_file_names_a_text_file(tmp_path: Path) -> None:
    file = tmp_path / "erasers.pt"
    file.write_text("not a checkpoint")
    with pytest.raises(CdistillError, match=r"erasers\.pt.*not a PyTorch checkpoint.*the fix"):
        load_torch_file(file, "erasers.pt", "the fix")
