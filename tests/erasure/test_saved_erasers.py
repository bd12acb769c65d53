"""An erasing run's erasers travel with its student: in its checkpoint and beside student.pt,
and every loader of a trained student applies them (cdistill.erasure.saved)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cdistill.erasure.base import LowRankEraser
from cdistill.erasure.hooks import erase
from cdistill.erasure.saved import ERASERS_FILE, attach_erasers, erasers_payload, saved_erasers
from cdistill.errors import CdistillError
from cdistill.models.load import load_student
from cdistill.models.students import create_student


def _eraser(d: int = 20, r: int = 3) -> LowRankEraser:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=gen))
    return LowRankEraser(q, q, torch.randn(d, generator=gen))


def _checkpoint(student: torch.nn.Module, eraser: LowRankEraser, fitted: bool = True) -> dict[str, Any]:
    state = {f"student.{k}": v for k, v in student.state_dict().items()}
    state |= {f"erasers.conv1.{k}": getattr(eraser, k) for k in LowRankEraser.resizable}
    state["artefacts_fitted"] = torch.tensor(fitted)
    hparams = {"student": {"name": "mnist_cnn"}, "erasure": {"layers": ["conv1"], "mode": "position", "method": "leace"}}
    return {"state_dict": state, "hyper_parameters": hparams, "pytorch-lightning_version": "2.0.0"}


@pytest.fixture
def parts() -> tuple[torch.nn.Module, LowRankEraser, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    student = create_student("mnist_cnn").eval()
    eraser = _eraser()
    x = torch.randn(4, 3, 28, 28)
    with torch.no_grad(), erase(student, {"conv1": eraser}, "position"):
        erased = student(x)
    return student, eraser, x, erased


def test_a_checkpoint_loads_with_its_erasers(parts: Any, tmp_path: Path) -> None:
    student, eraser, x, erased = parts
    file = tmp_path / "epoch_001.ckpt"
    torch.save(_checkpoint(student, eraser), file)
    loaded = load_student(file).model
    with torch.no_grad():
        assert torch.allclose(loaded(x), erased, atol=1e-5)
        assert not torch.allclose(student(x), erased, atol=1e-3)  # the eraser changes the output
    torch.save(_checkpoint(student, eraser, fitted=False), file)  # never fitted: training applied none
    assert saved_erasers(file) == {}


def test_student_pt_loads_the_erasers_file_beside_it(parts: Any, tmp_path: Path) -> None:
    student, eraser, x, erased = parts
    torch.save(student.state_dict(), tmp_path / "student.pt")
    with torch.no_grad():
        bare = load_student(tmp_path / "student.pt", name="mnist_cnn").model(x)
    assert torch.allclose(bare, student(x).detach(), atol=1e-6)  # no erasers file: the bare student
    torch.save(erasers_payload({"conv1": eraser}, {"conv1": "position"}), tmp_path / ERASERS_FILE)
    with torch.no_grad():
        assert torch.allclose(load_student(tmp_path / "student.pt", name="mnist_cnn").model(x), erased, atol=1e-5)


def test_saved_erasers_errors(parts: Any, tmp_path: Path) -> None:
    student, eraser, _, _ = parts
    ckpt = _checkpoint(student, eraser)
    del ckpt["state_dict"]["erasers.conv1.bias"]
    torch.save(ckpt, tmp_path / "damaged.ckpt")
    with pytest.raises(CdistillError, match="damaged"):
        saved_erasers(tmp_path / "damaged.ckpt")
    torch.save({"format": "something else"}, tmp_path / ERASERS_FILE)
    with pytest.raises(CdistillError, match="not a cdistill erasers file"):
        saved_erasers(tmp_path / "student.pt")
    with pytest.raises(CdistillError, match="conv9"):
        attach_erasers(create_student("mnist_cnn"), {"conv9": (eraser, "position")})


def test_student_pt_of_an_older_erasing_run_is_refused(parts: Any, tmp_path: Path) -> None:
    student, eraser, _, _ = parts
    torch.save(student.state_dict(), tmp_path / "student.pt")
    (tmp_path / "checkpoints").mkdir()
    torch.save(_checkpoint(student, eraser), tmp_path / "checkpoints" / "last.ckpt")
    with pytest.raises(CdistillError, match="erasers are not beside it"):
        load_student(tmp_path / "student.pt", name="mnist_cnn")
