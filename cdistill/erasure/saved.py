"""The erasers of a trained erasing run, with its student (docs/methods.md §4).

An erasing run (``experiment=<family>/leace``, ``rlace``, ...) trains its student with erasers
hooked into some layers; its predictions are the student's *with* those erasers. The student's
weights alone (``student.pt``, or the ``student.*`` part of a checkpoint) are another model, so
anything that loads a trained student to measure it must load the erasers too. They travel:

* in a cdistill checkpoint, as the task's ``erasers.<layer>.*`` buffers, with the layers and
  modes in ``hyper_parameters["erasure"]``;
* beside ``student.pt``, as :data:`ERASERS_FILE` (written by ``train.py`` for an erasing run):
  ``{"format": FORMAT, "erasers": {layer: {"mode", "proj_left", "proj_right", "bias"}}}``,
  plain tensors and strings (loadable with ``weights_only=True``).

:func:`saved_erasers` reads either; :func:`attach_erasers` hooks them into a model for good (a
model loaded to be measured is that run's model, erasers included).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cdistill.erasure.base import LowRankEraser
from cdistill.erasure.hooks import eraser_key, erasing_hook, specs_from_config
from cdistill.errors import CdistillError
from cdistill.utils.capture import resolve_module
from cdistill.utils.checkpoint_files import load_torch_file, run_checkpoint

ERASERS_FILE = "erasers.pt"
FORMAT = "cdistill-erasers/1"
FIX = "Give the run's checkpoint (checkpoints/*.ckpt), or its student.pt with the erasers.pt train.py wrote beside it."
#: Layer -> (eraser, mode).
Erasers = dict[str, tuple[LowRankEraser, str]]


def erasers_payload(erasers: Mapping[str, nn.Module], modes: Mapping[str, str]) -> dict[str, Any]:
    """What :data:`ERASERS_FILE` holds for layer -> eraser and layer -> mode."""
    out: dict[str, Any] = {}
    for layer, eraser in erasers.items():
        if not isinstance(eraser, LowRankEraser):
            raise CdistillError(f"The eraser at {layer!r} is a {type(eraser).__name__}; only low-rank erasers are saved.")
        out[layer] = {"mode": modes[layer], **{k: getattr(eraser, k).detach().cpu() for k in LowRankEraser.resizable}}
    return {"format": FORMAT, "erasers": out}


def _from_payload(payload: Mapping[str, Any], where: Path) -> Erasers:
    if payload.get("format") != FORMAT or not isinstance(payload.get("erasers"), Mapping):
        raise CdistillError(f"{where} is not a cdistill erasers file ({FORMAT}); rewrite it with train.py or remove it.")
    return {str(layer): (LowRankEraser(e["proj_left"], e["proj_right"], e["bias"]), str(e["mode"]))
            for layer, e in payload["erasers"].items()}


def _from_checkpoint(obj: Mapping[str, Any]) -> Erasers:
    """The erasers of a Lightning checkpoint dict (none: not an erasing run, or never fitted)."""
    state = obj.get("state_dict") or {}
    config = (obj.get("hyper_parameters") or {}).get("erasure")
    if not config or not bool(state.get("artefacts_fitted", torch.tensor(True))):
        return {}
    out: Erasers = {}
    for spec in specs_from_config(config):
        key = f"erasers.{eraser_key(spec.layer)}."
        parts = [state.get(key + name) for name in LowRankEraser.resizable]
        if not all(isinstance(p, Tensor) for p in parts):
            raise CdistillError(f"The checkpoint's config erases {spec.layer!r}, but it holds no {key}* buffers: "
                                "it is damaged; use another checkpoint of the run.")
        left, right, bias = (p for p in parts if isinstance(p, Tensor))
        out[spec.layer] = (LowRankEraser(left, right, bias), spec.mode)
    return out


def saved_erasers(file: Path, obj: Any | None = None) -> Erasers:
    """The erasers that go with the student weights in ``file``: a checkpoint's own, or the
    :data:`ERASERS_FILE` beside a plain state dict; ``{}`` when the run erased nothing.

    Args:
        file: The weights file (a ``.ckpt``, or a ``student.pt``).
        obj: ``file``'s loaded content when the caller has it (a checkpoint dict).
    """
    if obj is None and file.suffix == ".ckpt":
        obj = load_torch_file(file, "the model", FIX)
    if isinstance(obj, Mapping) and "state_dict" in obj:
        return _from_checkpoint(obj)
    beside = file.parent / ERASERS_FILE
    if beside.is_file():
        return _from_payload(load_torch_file(beside, str(ERASERS_FILE), FIX), beside)
    last = run_checkpoint(file)  # a run written before erasers.pt existed
    if last is not None and _from_checkpoint(load_torch_file(last, "the model", FIX)):
        raise CdistillError(
            f"{file} is the student of an erasing run, but its erasers are not beside it ({ERASERS_FILE} is "
            f"missing; the run predates it): the weights alone are another model. Give the run's checkpoint "
            f"instead (e.g. {last}, or the one selection.json names)."
        )
    return {}


def attach_erasers(model: nn.Module, erasers: Erasers) -> nn.Module:
    """Hook ``erasers`` into ``model`` for as long as it lives (they follow its device); returns it.

    Raises:
        CdistillError: A layer the model does not have (close names listed), or one whose size
            does not fit its eraser (at the first forward).
    """
    for layer, (eraser, mode) in erasers.items():
        module = resolve_module(model, layer)
        hook = erasing_hook(layer, eraser, mode)

        def on_device(mod: nn.Module, inputs: Any, output: Any, hook: Any = hook, eraser: nn.Module = eraser) -> Tensor:
            if isinstance(output, Tensor) and eraser.proj_left.device != output.device:
                eraser.to(output.device)
            return hook(mod, inputs, output)

        module.register_forward_hook(on_device)
    return model
