"""Read checkpoint files safely and say what a wrong one is.

Two kinds of file go into a run: a Lightning checkpoint (``ckpt_path``: resume a run from its
``checkpoints/last.ckpt``) and a plain state dict of the student (``student.pt``, for
``model.student.checkpoint_path``). Passing one where the other belongs, a file that
``torch.save`` did not write, or a checkpoint of another model used to end in a raw
``KeyError`` or a page of state-dict keys; these helpers name the file, what it holds, and
the fix.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from cdistill.errors import CdistillError

#: Key every Lightning checkpoint has.
LIGHTNING_KEY = "pytorch-lightning_version"
#: A run's latest Lightning checkpoint, relative to its output directory.
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"
#: Pickle protocol 2+ streams start with this byte (torch.save's legacy, non-zip format).
_PICKLE_MAGIC = b"\x80"


def _head(path: Path, n: int = 16) -> bytes:
    with path.open("rb") as f:
        return f.read(n)


def load_torch_file(path: str | Path, key: str, fix: str) -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors for files it cannot read.

    Args:
        path: The file (must exist).
        key: The config key that gave it (starts every error).
        fix: Sentence appended to every error: what the key takes.

    Returns:
        The loaded object (tensors on the CPU; memory-mapped when the file is a zip archive).

    Raises:
        CdistillError: Not a ``torch.save`` file (e.g. text), truncated or damaged, or holding
            pickled Python objects that ``weights_only=True`` refuses.
    """
    path = Path(path)
    name = f"{key} {str(path)!r}"
    is_zip = zipfile.is_zipfile(path)
    if not is_zip and _head(path).startswith(b"PK"):
        raise CdistillError(f"{name} is a damaged or truncated checkpoint (an incomplete zip archive). {fix}")
    if not is_zip and not _head(path).startswith(_PICKLE_MAGIC):
        raise CdistillError(
            f"{name} is not a PyTorch checkpoint (not written by torch.save; it starts with "
            f"{_head(path)!r}). {fix}"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as err:
        # torch's message is a page of advice; keep its one line that names the object.
        lines = [ln.strip() for ln in str(err).splitlines() if "WeightsUnpickler error" in ln]
        detail = lines[0].split(": ", 1)[-1].split(". Please")[0] if lines else str(err).splitlines()[0]
        raise CdistillError(
            f"{name} holds pickled Python objects, which cdistill does not load (checkpoints load "
            f"with weights_only=True): {detail}. {fix}"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CdistillError(f"{name} is damaged or truncated ({err}). {fix}") from err


def run_checkpoint(file: str | Path) -> Path | None:
    """The cdistill checkpoint that describes the weights in ``file``: ``file`` itself when it is
    a ``.ckpt``, else (a run's ``student.pt``) the run's :data:`LAST_CHECKPOINT` beside it; None
    when there is none. One rule for every reader that needs what a plain state dict lacks (the
    architecture, the run config, the erasers)."""
    path = Path(file)
    ckpt = path if path.suffix == ".ckpt" else path.parent / LAST_CHECKPOINT
    return ckpt if ckpt.is_file() else None


def recorded_config(obj: Any) -> dict[str, Any] | None:
    """The resolved run config a loaded cdistill checkpoint stores (``obj["cdistill"]["config"]``,
    YAML text); None for a file that stores none."""
    raw = ((obj.get("cdistill") or {}) if isinstance(obj, Mapping) else {}).get("config")
    config = yaml.safe_load(raw) if isinstance(raw, str) else None
    return config if isinstance(config, dict) else None


def describe(obj: Any) -> str:
    """What a loaded checkpoint file holds, in a few words (for error messages)."""
    if isinstance(obj, Mapping) and LIGHTNING_KEY in obj:
        student = (obj.get("hyper_parameters") or {}).get("student") or {}
        name = student.get("name") if isinstance(student, Mapping) else None
        return f"a Lightning checkpoint (epoch {obj.get('epoch')}, student {name or 'unknown'!r})"
    if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return f"a plain state dict of {len(obj)} tensors (like a run's student.pt)"
    return f"a {type(obj).__name__}, not a checkpoint"


def _mismatch(own: Mapping[str, torch.Tensor], theirs: Mapping[str, Any], shapes_of: str = "") -> str:
    """Missing and unexpected keys, and shape mismatches of keys starting with ``shapes_of``;
    empty when the two state dicts agree."""
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    wrong = [
        f"{k}: file {tuple(theirs[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k.startswith(shapes_of) and k in theirs and isinstance(theirs[k], torch.Tensor)
        and tuple(theirs[k].shape) != tuple(own[k].shape)
    ]
    parts = [
        f"{label} {items[:4]}{' ...' if len(items) > 4 else ''} ({len(items)})"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", wrong))
        if items
    ]
    return "; ".join(parts)


def check_resume_checkpoint(path: str | Path, model: nn.Module, student_name: str | None = None) -> None:
    """Check that ``path`` is a Lightning checkpoint that ``model`` can resume from.

    Only the student's shapes are compared: fitted artefacts (CAV bank, prototypes, erasers)
    are placeholders in a fresh module and adopt the checkpoint's shapes when it loads.

    Args:
        path: The ``ckpt_path`` file (must exist).
        model: The freshly built LightningModule of this run.
        student_name: This run's ``model.student.name`` (for the message).

    Raises:
        CdistillError: Not a Lightning checkpoint (a plain state dict such as ``student.pt``,
            another file), or a checkpoint of another model.
    """
    fix = "Give ckpt_path the checkpoints/last.ckpt of an earlier run of this config (or ckpt_path=null)."
    obj = load_torch_file(path, "ckpt_path", fix)
    what = describe(obj)
    if not (isinstance(obj, Mapping) and LIGHTNING_KEY in obj and isinstance(obj.get("state_dict"), Mapping)):
        hint = " To start from these weights, use model.student.checkpoint_path=<file> instead." if "state dict" in what else ""
        raise CdistillError(f"ckpt_path {str(path)!r} is {what}, not a Lightning checkpoint.{hint} {fix}")
    problems = _mismatch(model.state_dict(), obj["state_dict"], shapes_of="student.")
    if problems:
        raise CdistillError(
            f"ckpt_path {str(path)!r} is {what} of another model than this run's "
            f"({type(model).__name__}, student {student_name!r}): {problems}. Resume with the "
            "checkpoint of a run with the same model config, or fine-tune from its weights with "
            "model.student.checkpoint_path=<run>/student.pt."
        )
