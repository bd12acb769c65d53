"""Ablate one direction of a layer's activation inside a forward pass (docs/methods.md §5).

A layer's output is read as feature rows ``[..., d]`` in one of two *spaces*:

* ``position``: the channels at every position share one direction. A conv map
  ``[B, C, H, W]`` (any ``[B, C, *spatial]`` with at least two spatial dims) has its channels
  in dim 1; a token sequence ``[B, T, C]`` (ViT) has them last; a vector ``[B, C]`` is one row.
  A 1-d conv map ``[B, C, L]`` would be read as ``L`` channels per ``C`` tokens: use
  ``flatten`` for it, or patch a layer whose output is ``[B, C, H, W]``.
* ``flatten``: the whole activation of a sample is one row (d = C*H*W for a map).

Ablating a unit direction ``v`` replaces every row ``h`` by ``h − (h·v) v + r v``, where ``r``
is the mean of ``h·v`` (``mean``), 0 (``zero``) or ``h·v`` of another input of the batch at
the same position (``resample``); a subspace with orthonormal columns ``V [d, r]`` is ablated
the same way, ``h − V Vᵀ h + V Vᵀ r``. :func:`ablate` applies it with a forward hook that replaces
the layer's output, and always removes the hook on exit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cdistill.errors import CdistillError, unknown_name
from cdistill.utils.capture import parse_layer, resolve_module

MODES = ("mean", "zero", "resample")
SPACES = ("position", "flatten")


def check_mode(mode: str) -> None:
    """Raise a :class:`CdistillError` unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise unknown_name("ablation mode", mode, MODES, "Pass mode= one of these.")


def check_space(space: str | None) -> None:
    """Raise a :class:`CdistillError` unless ``space`` is ``None`` or one of :data:`SPACES`."""
    if space is not None and space not in SPACES:
        raise unknown_name("activation space", space, SPACES, "Pass space= one of these (or None).")


def default_space(act: Tensor) -> str:
    """``position`` for maps and token sequences (``ndim >= 3``), ``flatten`` for vectors."""
    return "position" if act.ndim >= 3 else "flatten"


def to_rows(act: Tensor, space: str) -> Tensor:
    """View a layer output ``[B, ...]`` as rows ``[B, ..., d]`` (see the module docstring)."""
    if space == "flatten":
        return act.reshape(act.shape[0], -1)
    if act.ndim >= 4:  # [B, C, *spatial]: channels first
        return act.movedim(1, -1)
    return act  # [B, T, C] tokens or [B, C]: channels already last


def from_rows(rows: Tensor, like: Tensor, space: str) -> Tensor:
    """Inverse of :func:`to_rows`: rows ``[B, ..., d]`` back to the shape of ``like``."""
    if space == "flatten":
        return rows.reshape(like.shape)
    if like.ndim >= 4:
        return rows.movedim(-1, 1)
    return rows


@dataclass
class Ablation:
    """What the hook does to the layer's output; the caller mutates it between forwards.

    Attributes:
        mode: One of :data:`MODES`.
        space: One of :data:`SPACES`.
        direction: Unit vector ``[d]`` to ablate (in the working dtype), or orthonormal columns
            ``[d, r]`` whose span is ablated at once (:mod:`cdistill.causal.reliance`);
            ``None`` leaves the output untouched.
        mean: Mean row ``[d]`` over all inputs (``mean`` mode): ``r = mean · v``.
        source: ``[B]`` index of the input whose ``h·v`` each sample takes (``resample``).
    """

    mode: str
    space: str
    direction: Tensor | None = None
    mean: Tensor | None = None
    source: Tensor | None = None

    def apply(self, act: Tensor) -> Tensor:
        """Return ``act`` with the direction ablated (unchanged without a direction).

        The edit is computed in the direction's dtype (float32 or wider for half-precision
        layers) and cast back to ``act``'s dtype.
        """
        v = self.direction
        if v is None:
            return act
        if v.ndim == 2:
            return self._apply_subspace(act, v)
        rows = to_rows(act, self.space).to(v.dtype)
        coef = rows @ v  # [B, ...]
        if self.mode == "mean":
            assert self.mean is not None, "mean mode needs the mean activation"
            target = (self.mean @ v).expand_as(coef)
        elif self.mode == "zero":
            target = coef.new_zeros(())
        else:
            assert self.source is not None, "resample mode needs the source indices"
            target = coef[self.source]
        rows = rows + (target - coef).unsqueeze(-1) * v
        return from_rows(rows.to(act.dtype), act, self.space)

    def _apply_subspace(self, act: Tensor, basis: Tensor) -> Tensor:
        """:meth:`apply` for orthonormal columns ``basis [d, r]``: ``h − P h + P r`` with
        ``P = V Vᵀ``, the same three choices of ``r`` as for one direction."""
        rows = to_rows(act, self.space).to(basis.dtype)
        coef = rows @ basis  # [B, ..., r]
        if self.mode == "mean":
            assert self.mean is not None, "mean mode needs the mean activation"
            target = (self.mean @ basis).expand_as(coef)
        elif self.mode == "zero":
            target = torch.zeros_like(coef)
        else:
            assert self.source is not None, "resample mode needs the source indices"
            target = coef[self.source]
        rows = rows + (target - coef) @ basis.T
        return from_rows(rows.to(act.dtype), act, self.space)


def _check_index(layer: str, output: Any, index: int) -> None:
    if not isinstance(output, (tuple, list)) or not -len(output) <= index < len(output):
        raise CdistillError(
            f"Layer {layer!r}: element {index} does not exist in the module's output "
            f"({type(output).__name__}); fix or drop the ':index' suffix."
        )


def select_output(layer: str, output: Any, index: int | None) -> Tensor:
    """The tensor a layer spec names in a module's output (element ``index`` of a tuple)."""
    if index is not None:
        _check_index(layer, output, index)
        output = output[index]
    if not isinstance(output, Tensor):
        raise CdistillError(
            f"Layer {layer!r} returns {type(output).__name__}, not a tensor. Pick a "
            "submodule that returns a tensor, or an element of a tuple output ('path:0')."
        )
    return output


def replace_output(layer: str, output: Any, index: int | None, ablation: Ablation) -> Any:
    """A module's ``output`` with :meth:`Ablation.apply` applied to the tensor ``layer`` names
    (element ``index`` of a tuple or list; the other elements are passed through). The hook
    of :func:`ablate` and the tail replay of :mod:`cdistill.causal.tail` both edit through it."""
    if index is None:
        return ablation.apply(select_output(layer, output, None))
    _check_index(layer, output, index)
    replaced = list(output)
    replaced[index] = ablation.apply(select_output(layer, output, index))
    if hasattr(output, "_fields"):  # a namedtuple takes its fields positionally
        return type(output)(*replaced)
    return type(output)(replaced) if isinstance(output, tuple) else replaced


@contextmanager
def watch(model: nn.Module, layer: str, read: Callable[[Tensor], None]) -> Iterator[None]:
    """Call ``read`` on the output of ``layer`` in every forward inside the block.

    ``read`` runs inside the hook, before any later module (e.g. ``ReLU(inplace=True)``) can
    modify the output in place, so it must consume the tensor there and then.

    Raises:
        CdistillError: ``layer`` is not a module path (close names are listed).
    """
    module = resolve_module(model, layer)
    index = parse_layer(layer)[1]

    def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
        read(select_output(layer, output, index))

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def ablate(model: nn.Module, layer: str, ablation: Ablation) -> Iterator[Ablation]:
    """Apply ``ablation`` to the output of ``layer`` in every forward inside the block.

    Args:
        model: The model.
        layer: Module path, optionally ``"path:i"`` for element ``i`` of a tuple output.
        ablation: The edit; mutate its ``direction`` / ``source`` between forwards.

    Yields:
        ``ablation``.

    Raises:
        CdistillError: ``layer`` is not a module path (close names are listed).
    """
    module = resolve_module(model, layer)
    index = parse_layer(layer)[1]

    def hook(mod: nn.Module, inputs: Any, output: Any) -> Any:
        return replace_output(layer, output, index, ablation)

    handle = module.register_forward_hook(hook)
    try:
        yield ablation
    finally:
        handle.remove()
