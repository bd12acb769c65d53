"""Find and load a trained student from what a user has at hand: a cdistill checkpoint
(``*.ckpt``), a run's ``student.pt``, a run directory, or a student name plus a local weights
file. Used by ``python -m cdistill.concepts check --model``, ``cdistill-measure`` and the
pipeline's ``pipeline.base_ckpt``. Every file loads with ``weights_only=True``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from cdistill.erasure.saved import attach_erasers, saved_erasers
from cdistill.errors import CdistillError
from cdistill.models.students import STUDENTS, create_student, load_weights
from cdistill.utils.checkpoint_files import (
    LAST_CHECKPOINT,
    LIGHTNING_KEY,
    describe,
    load_torch_file,
    recorded_config,
)

#: What a run directory holds, in the order it is looked for.
RUN_FILES = ("student.pt", LAST_CHECKPOINT.as_posix())
FIX = "Give a cdistill checkpoint (*.ckpt), a run's student.pt, a run directory, or a student name with a weights file."


@dataclass
class LoadedStudent:
    """A student and what its file said about it.

    Attributes:
        model: The student, weights loaded, in eval mode, on the CPU.
        student: The keyword arguments it was built with (``create_student(**student)``).
        file: The weights file (None: a name without weights, i.e. untrained).
        config: The resolved run config a cdistill checkpoint stores (None for a plain state dict).
        input_mean, input_std: The training data's per-channel statistics where the checkpoint
            holds them (the concept-distillation module does), else None.
    """

    model: nn.Module
    student: dict[str, Any]
    file: Path | None
    config: dict[str, Any] | None = None
    input_mean: Tensor | None = None
    input_std: Tensor | None = None
    notes: list[str] = field(default_factory=list)


def resolve_weights(path: str | Path, key: str = "the model") -> Path:
    """The weights file ``path`` names: the file itself, or in a run directory its
    ``student.pt`` (else ``checkpoints/last.ckpt``).

    Raises:
        CdistillError: Nothing there, naming ``key`` (the option that gave it).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        for rel in RUN_FILES:
            if (p / rel).is_file():
                return p / rel
        raise CdistillError(f"{key}={str(p)!r} is a folder without {' or '.join(RUN_FILES)}. {FIX}")
    if not p.is_file():
        raise CdistillError(f"{key}={str(p)!r} does not exist. {FIX}")
    return p


def _lightning(obj: Any) -> bool:
    return isinstance(obj, Mapping) and LIGHTNING_KEY in obj and isinstance(obj.get("state_dict"), Mapping)


def _shape_kwargs(state: Mapping[str, Any]) -> dict[str, int]:
    """``num_classes`` and ``in_chans`` read off a plain state dict: the last 2-D weight is the
    head (``[classes, features]``), the first 4-D weight the first conv (``[out, in, k, k]``)."""
    out: dict[str, int] = {}
    mats = [v for k, v in state.items() if k.endswith("weight") and isinstance(v, Tensor) and v.ndim == 2]
    convs = [v for k, v in state.items() if k.endswith("weight") and isinstance(v, Tensor) and v.ndim == 4]
    if mats:
        out["num_classes"] = int(mats[-1].shape[0])
    if convs:
        out["in_chans"] = int(convs[0].shape[1])
    return out


def _accepts(name: str, arg: str) -> bool:
    """Whether the registered student ``name`` takes keyword ``arg`` (e.g. ``image_size``)."""
    return name in STUDENTS and arg in inspect.signature(STUDENTS.get(name)).parameters


def load_student(
    ref: str | Path,
    *,
    name: str | None = None,
    weights: str | Path | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    architecture: Mapping[str, Any] | None = None,
) -> LoadedStudent:
    """Load a trained student.

    Args:
        ref: A cdistill checkpoint (its stored student config builds the model), a plain
            state dict (``student.pt``: the architecture comes from ``name``, else from a
            ``checkpoints/last.ckpt`` beside it), a run directory (see :func:`resolve_weights`),
            or a student name (registry, ``timm:<m>``, ``torchvision:<m>``) with ``weights``.
        name: Student name for a plain state dict (overrides the one found beside it).
        weights: Local weights for a student name (None: the untrained model, noted).
        image_size: Input side, for students built for one (the MNIST CNN).
        num_classes, in_chans: For a name or plain state dict (default: read off the weights).
        architecture: ``create_student`` keywords (a config's ``model.student``) for a plain
            state dict when no ``name`` is given.

    Raises:
        CdistillError: A missing or unreadable file, a plain state dict with no way to tell
            its architecture, or weights that do not fit the architecture.
    """
    text = str(ref)
    looks_like_path = Path(text).expanduser().exists() or text.endswith((".pt", ".pth", ".ckpt", ".safetensors")) or "/" in text
    if not looks_like_path:
        return _from_name(text, weights, image_size, num_classes, in_chans)
    file = resolve_weights(text)
    obj = load_torch_file(file, "the model", FIX)
    if _lightning(obj):
        student = dict((obj.get("hyper_parameters") or {}).get("student") or {})
        if not student.get("name"):
            raise CdistillError(f"{str(file)!r} is {describe(obj)} without a student config; give --student NAME. {FIX}")
        loaded = _build(student, file, obj)
        loaded.config = recorded_config(obj)
        state = obj["state_dict"]
        if "input_mean" in state and "input_std" in state:
            loaded.input_mean, loaded.input_std = state["input_mean"].float(), state["input_std"].float()
        return loaded
    if not (isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values())):
        raise CdistillError(f"{str(file)!r} is {describe(obj)}. {FIX}")
    if name is None and architecture is not None:
        return _build(architecture, file)
    if name is None:
        beside = file.parent / LAST_CHECKPOINT  # not run_checkpoint: file is a plain state dict, even if named *.ckpt
        if beside.is_file():
            found = load_torch_file(beside, "the model", FIX)
            if _lightning(found) and (found.get("hyper_parameters") or {}).get("student"):
                student = dict(found["hyper_parameters"]["student"])
                loaded = _build(student, file)
                loaded.notes.append(f"architecture from {beside}")
                return loaded
        raise CdistillError(
            f"{str(file)!r} is {describe(obj)}: the architecture is not in it and no checkpoints/last.ckpt lies "
            "beside it. Name the student (--student mnist_cnn), or give the run's config (--config experiment=...)."
        )
    return _from_name(name, file, image_size, num_classes, in_chans, state=obj)


def _from_name(name: str, weights: str | Path | None, image_size: int | None, num_classes: int | None,
               in_chans: int | None, state: Mapping[str, Any] | None = None) -> LoadedStudent:
    file = resolve_weights(weights, "the weights") if weights is not None else None
    if state is None and file is not None:
        state = load_torch_file(file, "the weights", FIX)
        if _lightning(state):
            state = {k.removeprefix("student."): v for k, v in state["state_dict"].items() if k.startswith("student.")}
    shapes = _shape_kwargs(state) if isinstance(state, Mapping) else {}
    student: dict[str, Any] = {"name": name, "num_classes": num_classes or shapes.get("num_classes", 10)}
    chans = in_chans or shapes.get("in_chans")
    if chans is not None:
        student["in_chans"] = chans
    if image_size is not None and _accepts(name, "image_size"):
        student["image_size"] = int(image_size)
    loaded = _build(student, file)
    if file is None:
        loaded.notes.append(f"{name}: no weights given, the model is untrained (random initialisation)")
    return loaded


def _build(student: Mapping[str, Any], file: Path | None, obj: Any | None = None) -> LoadedStudent:
    """``create_student`` from ``student`` (no hub download, no init file), then ``file``'s
    weights and erasers (``obj``: ``file``'s loaded content when the caller has it)."""
    kw = {k: v for k, v in student.items() if k not in ("checkpoint_path", "init_path", "pretrained")}
    model = create_student(**kw)
    if file is not None:
        load_weights(model, file, key="the model")
        attach_erasers(model, saved_erasers(file, obj))  # an erasing run's model includes its erasers
    model.eval()
    return LoadedStudent(model, dict(kw), file)
