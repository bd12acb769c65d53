"""Causal basis extraction: the directions of a layer the output depends on most (methods §5).

The *energy* of a unit direction ``v`` at a layer is the mean, over the inputs, of
``KL(p || q)``: ``p`` the model's output distribution on the unmodified input, ``q`` the one
after ablating ``v`` (:mod:`cdistill.causal.ablation`; the objective is
:mod:`cdistill.causal.energy`). Vector ``j`` maximises the energy over unit vectors orthogonal
to ``v_1..v_{j-1}`` (L-BFGS on the sphere, :mod:`cdistill.causal.sphere`).

Inputs stream: ``p`` is computed once per batch in a first pass (:mod:`cdistill.causal.reference`,
which also accumulates the mean activation for ``mean`` mode), and every function evaluation loops over the batches,
back-propagating each batch's share of the loss into ``u`` before the next one runs.

The part of the model before the layer does not depend on ``u``: where the model can be traced
(:mod:`cdistill.causal.tail`), the first pass also caches each batch's layer output and the
values computed before the layer that the rest still reads, and every evaluation runs only the
rest (the *tail*) on the ablated cached output. Before it is used, the unpatched tail must
reproduce the model's outputs on every batch. Otherwise (or with ``tail=False``) every
evaluation runs the whole model with the ablation hook, and one INFO line says why.

Under DDP (``torch.distributed`` initialised) every rank streams its own inputs; the mean
activation, the loss and the gradient of ``u`` are summed across ranks (each rank's share is
already divided by the total number of inputs, so the sum is the mean over all inputs), and
the ranks therefore take identical L-BFGS steps; rank 0's basis is broadcast at the end.

Example::

    bases = extract_causal_bases(model, "layer4", loader, k=8)
    b = bases["layer4"].basis  # [512, 8], columns orthonormal, by energy descending
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cdistill.causal.ablation import Ablation, ablate, check_mode, check_space
from cdistill.causal.common import all_reduce_sum, distributed, log_probs, model_device
from cdistill.causal.energy import Energy
from cdistill.causal.inputs import InputBatches
from cdistill.causal.reference import Reference, reference_pass
from cdistill.causal.sphere import greedy_basis, progress_bar
from cdistill.causal.tail import TailReplay, TailUnavailable, build_tail
from cdistill.errors import CdistillError
from cdistill.utils.capture import eval_mode, resolve_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CausalBasis:
    """The causal basis of one layer.

    Attributes:
        basis: ``[d, k']`` orthonormal columns, by energy descending (``k' <= k``: the
            extraction stops at the first energy under ``min_energy``). ``d`` is the channel
            count in ``position`` space and the flattened activation size in ``flatten``.
        energies: ``[k']`` mean KL divergence of each column's ablation, descending.
        layer: The layer spec.
        mode: Ablation mode (``mean``, ``zero`` or ``resample``).
        space: ``position`` or ``flatten``.
    """

    basis: Tensor
    energies: Tensor
    layer: str
    mode: str
    space: str


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """No gradient into the parameters inside the block; ``requires_grad`` restored after."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _extract_layer(
    model: nn.Module,
    layer: str,
    batches: InputBatches,
    ref: Reference,
    k: int,
    mode: str,
    max_iter: int,
    min_energy: float,
    progress: bool,
    replay: TailReplay | None,
) -> CausalBasis:
    stats = ref.layers[layer]
    if k > stats.dim:
        raise CdistillError(
            f"k={k} directions asked for layer {layer!r}, but its {stats.space} space has only "
            f"d={stats.dim} dimensions. Pass k <= {stats.dim} (or space='flatten' for more)."
        )
    ablation = Ablation(mode, stats.space, mean=stats.mean)
    objective = Energy(model, layer, batches, ref, ablation, replay)
    bar = progress_bar(k, f"causal basis {layer}", progress)
    hook = ablate(model, layer, ablation) if replay is None else nullcontext()
    with hook, closing(bar):
        basis, energies = greedy_basis(objective, stats, k, max_iter, min_energy, bar)
    values = torch.stack(energies) if energies else torch.zeros(0, dtype=stats.dtype, device=stats.mean.device)
    order = torch.argsort(values, descending=True)
    basis, values = basis[:, order].contiguous(), values[order].contiguous()
    if distributed():  # the ranks took identical steps; make the result bitwise identical
        dist.broadcast(basis, src=0)
        dist.broadcast(values, src=0)
    return CausalBasis(basis.detach(), values.detach(), layer, mode, stats.space)


def _tail_replays(model: nn.Module, specs: Sequence[str], tail: bool | None) -> dict[str, TailReplay]:
    """A tail replay per layer that has one (``tail=None``: the others are logged)."""
    replays: dict[str, TailReplay] = {}
    if tail is False:
        return replays
    for spec in specs:
        try:
            replays[spec] = build_tail(model, spec)
        except TailUnavailable as err:
            if tail:
                raise
            log.info("Causal basis at %r runs the whole model per evaluation: %s.", spec, err.reason)
    return replays


#: How far the unpatched tail's log-probabilities may be from the model's (both are computed
#: by the same ops, so a slice of the graph that misses something is off by far more).
_TAIL_TOLERANCE = 1e-4


@torch.no_grad()
def _tail_mismatch(replay: TailReplay, ref: Reference) -> str | None:
    """Why the unpatched tail does not reproduce the model's outputs, or ``None`` if it does."""
    for b, lp in enumerate(ref.log_p):
        if not lp.numel():
            continue
        if not replay.recorded(b):
            return f"the layer did not run on batch {b}"
        lq = log_probs(replay.unpatched(b))
        if lq.shape != lp.shape:
            return f"the tail's outputs have shape {tuple(lq.shape)}, the model's {tuple(lp.shape)}"
        if not torch.allclose(lq, lp, rtol=_TAIL_TOLERANCE, atol=_TAIL_TOLERANCE):
            gap = float((lq - lp).abs().nan_to_num(float("inf")).max())
            return f"the tail's outputs differ from the model's on batch {b} (max |log p gap| {gap:.3g})"
    return None


def _verified(
    replays: dict[str, TailReplay], specs: Sequence[str], ref: Reference, tail: bool | None
) -> dict[str, TailReplay]:
    """The replays whose unpatched tail reproduces the model on every batch of every rank.

    Under DDP every rank takes part in one all-reduce per layer, with or without a replay, so
    that all ranks keep the same replays.
    """
    if tail is False:
        return {}
    kept: dict[str, TailReplay] = {}
    device = ref.device()
    for spec in specs:
        replay = replays.get(spec)
        reason = "no tail on this rank" if replay is None else _tail_mismatch(replay, ref)
        failed = all_reduce_sum(torch.tensor([float(reason is not None)], device=device))
        if replay is None:
            continue  # already logged (or raised) when the tail could not be built
        if float(failed) == 0:
            kept[spec] = replay
            continue
        replay.release()
        reason = reason or "the tail differs from the model on another rank"
        if tail:
            raise TailUnavailable(spec, reason)
        log.info("Causal basis at %r runs the whole model per evaluation: %s.", spec, reason)
    return kept


def extract_causal_bases(
    model: nn.Module,
    layers: str | Sequence[str],
    inputs: Tensor | Iterable[Any],
    k: int,
    *,
    mode: str = "mean",
    space: str | None = None,
    max_iter: int = 100,
    min_energy: float = 0.0,
    seed: int = 0,
    progress: bool = False,
    tail: bool | None = None,
) -> dict[str, CausalBasis]:
    """Extract an ordered orthonormal basis of the directions each layer's output matters by.

    The model runs in eval mode (each module's mode is restored afterwards); its parameters
    are neither changed nor given gradients (``requires_grad`` is restored). Layers are
    treated one at a time, the others unmodified. Everything runs on the model's device.

    Args:
        model: A classifier returning logits ``[B, K]`` (or an object with ``.logits``).
        layers: One module path or several (``"path:i"`` for element ``i`` of a tuple output).
        inputs: A tensor ``[N, ...]`` (one batch), or a re-iterable of batches (tensors,
            ``(x, y)`` tuples, mappings with ``"image"``; e.g. a DataLoader without shuffling)
            that yields the same batches on every pass. Never concatenated.
        k: Number of directions per layer, ``1 <= k <= d``.
        mode: ``r`` of the ablation ``h − (h·v) v + r v``: ``mean`` (mean of ``h·v`` over all
            inputs), ``zero``, or ``resample`` (``h·v`` of another input of the same batch,
            from a fixed seeded derangement; batches need at least 2 inputs).
        space: ``position`` (channels at every position of ``[B, C, H, W]`` or token of
            ``[B, T, C]``, d = C) or ``flatten`` (d = the activation size of one sample);
            ``None``: ``position`` for maps and tokens, ``flatten`` for vectors ``[B, C]``.
        max_iter: L-BFGS iterations per direction.
        min_energy: Stop at the first direction whose energy falls under this (it is dropped).
        seed: Seed of the resampling derangements.
        progress: Show a tqdm bar per layer (when tqdm is installed).
        tail: Evaluate only the part of the model after the layer on cached layer outputs
            (:mod:`cdistill.causal.tail`; same results, much faster for a late layer; the
            inputs are then read once, and every layer's cached outputs stay on the device
            until its extraction ends). ``None``: where the model can be traced and the tail
            reproduces its outputs, otherwise the full forward with one INFO log line saying
            why; ``True``: required; ``False``: always the full forward.

    Returns:
        Layer spec -> :class:`CausalBasis`.

    Raises:
        CdistillError: An unknown layer (close names listed), mode or space; ``k`` out of
            range; empty inputs or a one-shot iterator; ``resample`` with a batch of one;
            ``tail=True`` where the tail replay is impossible (the reason is named).
        NonFiniteError: NaN/Inf in the model's outputs or in the energy.
    """
    specs = [layers] if isinstance(layers, str) else list(layers)
    if not specs:
        raise CdistillError("No layers given to extract_causal_bases: name at least one module path.")
    check_mode(mode)
    check_space(space)
    if not isinstance(k, int) or k < 1:
        raise CdistillError(f"k={k!r} directions: pass an integer k >= 1.")
    if max_iter < 1:
        raise CdistillError(f"max_iter={max_iter}: pass at least 1 L-BFGS iteration.")
    for spec in specs:
        resolve_module(model, spec)  # every name checked before any work
    batches = InputBatches(inputs, model_device(model))
    with eval_mode(model), _frozen(model):
        replays = _tail_replays(model, specs, tail)  # traced in eval mode, as it will run
        try:
            ref = reference_pass(model, specs, batches, space, mode, seed, replays)
            if mode == "resample" and any(s.shape[0] == 1 for s in ref.sources):
                raise CdistillError(
                    "mode='resample' takes h·v from another input of the same batch, but a batch "
                    "holds a single input. Use batches of at least 2 inputs."
                )
            replays = _verified(replays, specs, ref, tail)
            bases: dict[str, CausalBasis] = {}
            for spec in specs:
                replay = replays.get(spec)
                bases[spec] = _extract_layer(
                    model, spec, batches, ref, k, mode, max_iter, min_energy, progress, replay
                )
                if replay is not None:
                    replay.release()  # this layer's cache is no longer needed
            return bases
        finally:
            for replay in replays.values():
                replay.release()
