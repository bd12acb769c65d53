"""Causal basis extraction: the directions of a layer the output depends on most (methods §5).

The *energy* of a unit direction ``v`` at a layer is the mean, over the inputs, of
``KL(p || q)``: ``p`` the model's output distribution on the unmodified input, ``q`` the one
after ablating ``v`` (:mod:`cdistill.causal.ablation`). Vector ``j`` maximises the energy
over unit vectors orthogonal to ``v_1..v_{j-1}``: an unconstrained ``u`` is projected away
from the earlier vectors and normalised inside the objective, and L-BFGS with a strong Wolfe
line search minimises the negative energy. It starts from the standard basis vector off the
span of the earlier ones along which the ablation moves the activation most, and the loss is
divided by its starting value so that the optimiser's tolerances (the dtype's eps) are relative.

Inputs stream: ``p`` is computed once per batch in a first pass (which also accumulates the
mean activation for ``mean`` mode), and every function evaluation loops over the batches,
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

import functools
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, closing, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cdistill.causal.ablation import (
    Ablation,
    ablate,
    check_mode,
    check_space,
    default_space,
    to_rows,
    watch,
)
from cdistill.causal.inputs import InputBatches
from cdistill.causal.tail import TailReplay, TailUnavailable, build_tail
from cdistill.errors import CdistillError, NonFiniteError
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


@dataclass
class _LayerStats:
    """What the first pass learned about one layer."""

    space: str
    dim: int
    dtype: torch.dtype
    mean: Tensor  # [d] mean row over all inputs (and positions), working dtype
    spread: Tensor  # [d] mean squared distance of each coordinate from its ablated value r


@dataclass
class _Reference:
    """The unmodified outputs and the per-batch resampling sources."""

    log_p: list[Tensor]  # per batch [B, K]
    sources: list[Tensor]  # per batch [B] (resample mode)
    total: int  # inputs over all ranks
    layers: dict[str, _LayerStats]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_reduce_sum(t: Tensor) -> Tensor:
    if _distributed():
        dist.all_reduce(t)
    return t


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision tensors, the tensor's own dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def _logits(output: Any) -> Tensor:
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise CdistillError(
        f"The model returned {type(output).__name__}; the causal basis needs logits [B, K] "
        "(a tensor, or an object with a .logits tensor). Wrap the model to return them."
    )


def _log_probs(output: Any) -> Tensor:
    logits = _logits(output)
    return F.log_softmax(logits.to(_work_dtype(logits.dtype)).reshape(logits.shape[0], -1), dim=-1)


def _derangement(n: int, gen: torch.Generator) -> Tensor:
    """``[n]`` source indices with no fixed point: sample ``order[j]`` takes ``order[j-1]``."""
    order = torch.randperm(n, generator=gen)
    source = torch.empty_like(order)
    source[order] = order.roll(1)
    return source


class _Moments:
    """Streaming float64 sums of one layer's rows (read at hook time; see :func:`watch`)."""

    def __init__(self, layer: str, space: str | None) -> None:
        self.layer = layer
        self.space = space
        self.dtype = torch.float32
        self.sum: Tensor | None = None
        self.squares: Tensor | None = None
        self.rows = 0
        self.seen = False

    def __call__(self, act: Tensor) -> None:
        self.seen = True
        if self.space is None:
            self.space = default_space(act)
        self.dtype = act.dtype
        rows = to_rows(act.detach(), self.space)
        rows = rows.reshape(-1, rows.shape[-1]).double()
        if self.sum is None or self.squares is None:
            self.sum, self.squares = rows.sum(0), rows.pow(2).sum(0)
        elif self.sum.shape[0] != rows.shape[1]:
            raise CdistillError(
                f"Layer {self.layer!r} changed its row size between batches "
                f"({self.sum.shape[0]} -> {rows.shape[1]}) in {self.space!r} space: give "
                "inputs of one size, or use position space."
            )
        else:
            self.sum += rows.sum(0)
            self.squares += rows.pow(2).sum(0)
        self.rows += rows.shape[0]

    def stats(self, mode: str) -> _LayerStats:
        """Reduce across ranks; the spread is the mean squared distance from ``r``."""
        assert self.sum is not None and self.squares is not None and self.space is not None
        n = self.sum.new_tensor([float(self.rows)])
        packed = _all_reduce_sum(torch.cat([self.sum, self.squares, n]))
        dim = self.sum.shape[0]
        mean, second = packed[:dim] / packed[-1], packed[dim:-1] / packed[-1]
        spread = second if mode == "zero" else (second - mean.pow(2)).clamp_min(0)
        work = _work_dtype(self.dtype)
        return _LayerStats(self.space, dim, work, mean.to(work), spread.to(work))


@torch.no_grad()
def _reference_pass(
    model: nn.Module,
    layers: Sequence[str],
    batches: InputBatches,
    space: str | None,
    mode: str,
    seed: int,
    replays: dict[str, TailReplay],
) -> _Reference:
    """Stream once: unmodified log-probabilities per batch, per-layer row moments and shapes,
    and what each layer's tail replay reads."""
    gen = torch.Generator().manual_seed(seed)
    log_p: list[Tensor] = []
    sources: list[Tensor] = []
    moments = {layer: _Moments(layer, space) for layer in layers}
    count = 0
    with ExitStack() as stack:
        for layer in layers:
            stack.enter_context(watch(model, layer, moments[layer]))
        for replay in replays.values():
            stack.enter_context(replay.recording())
        for x in batches:
            if x.shape[0] == 0:  # placeholders keep the batch indices aligned
                log_p.append(torch.zeros(0, device=x.device))
                sources.append(torch.zeros(0, dtype=torch.long, device=x.device))
                for replay in replays.values():
                    replay.record(None)
                continue
            lp = _log_probs(model(x))
            for replay in replays.values():
                replay.record(x)
            if not bool(torch.isfinite(lp).all()):
                raise NonFiniteError(
                    "Non-finite model outputs (NaN/Inf) on the unmodified inputs: the causal "
                    "energy is undefined. Check the inputs and the model's weights."
                )
            log_p.append(lp)
            sources.append(_derangement(x.shape[0], gen).to(x.device))
            count += x.shape[0]
    if count == 0:
        raise CdistillError(
            "No inputs: the tensor or the batches given to extract_causal_bases are empty. "
            "Pass at least one input (on every rank under DDP)."
        )
    for layer, m in moments.items():
        if not m.seen:
            raise CdistillError(
                f"Layer {layer!r} produced no output in a forward pass of the model: it is not "
                "on the forward path. Pick a layer the forward pass runs."
            )
    device = next(lp.device for lp in log_p if lp.numel())
    total = int(_all_reduce_sum(torch.tensor([float(count)], device=device)).item())
    return _Reference(log_p, sources, total, {layer: m.stats(mode) for layer, m in moments.items()})


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


def _progress(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar when enabled and tqdm is installed, otherwise a no-op stand-in."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc)
        except ImportError:
            pass
    return _NoBar()


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


class _Energy:
    """The energy objective of one layer: negative mean KL as a function of ``u``."""

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        batches: InputBatches,
        ref: _Reference,
        ablation: Ablation,
        replay: TailReplay | None,
    ) -> None:
        self.model = model
        self.layer = layer
        self.batches = batches
        self.ref = ref
        self.ablation = ablation
        self.replay = replay
        self.scale: float | None = None  # set by the first evaluation of each vector
        self.floor = 0.0

    def start(self, floor: float) -> None:
        """Begin a new vector: the next evaluation fixes the loss scale, at least ``floor``."""
        self.scale, self.floor = None, floor

    @staticmethod
    def direction(u: Tensor, basis: Tensor) -> Tensor:
        """``u`` projected away from the columns of ``basis [d, j]`` and normalised -> ``[d]``."""
        w = u - basis @ (basis.T @ u) if basis.shape[1] else u
        return w / w.norm()

    def _nonempty(self) -> Iterator[tuple[int, Tensor | None]]:
        """``(b, x)`` per non-empty batch; ``x`` is ``None`` with a tail replay (not needed)."""
        if self.replay is not None:
            replay = self.replay
            yield from ((b, None) for b in range(replay.batches) if replay.recorded(b))
        else:
            yield from ((b, x) for b, x in enumerate(self.batches) if x.shape[0])

    def _batch_kl(self, b: int, x: Tensor | None, v: Tensor) -> Tensor:
        self.ablation.direction = v
        self.ablation.source = self.ref.sources[b]
        if self.replay is not None:
            output = self.replay(b, self.ablation)  # the part after the layer, on its cached output
        else:
            assert x is not None
            output = self.model(x)  # the whole model; the hook of ablate() edits the layer
        log_q = _log_probs(output)
        kl = F.kl_div(log_q, self.ref.log_p[b], reduction="sum", log_target=True)
        return kl / self.ref.total

    def loss_and_grad(self, u: Tensor, basis: Tensor, j: int) -> Tensor:
        """Negative energy at ``u``, divided by the vector's loss scale; fills ``u.grad``.

        The scale (the energy at the starting point, at least the floor) makes L-BFGS's
        absolute tolerances relative: a network whose energies are all ~1e-5 would otherwise
        stop after one iteration.
        """
        u.grad = torch.zeros_like(u)
        total = torch.zeros((), dtype=u.dtype, device=u.device)
        with torch.enable_grad():
            for b, x in self._nonempty():
                loss = -self._batch_kl(b, x, self.direction(u, basis))
                if not loss.requires_grad:
                    raise CdistillError(
                        f"The model's output does not depend differentiably on layer "
                        f"{self.layer!r} (no gradient reaches the ablated direction). Pick a "
                        "layer on the differentiable path to the logits."
                    )
                loss.backward()
                total += loss.detach()
        _all_reduce_sum(u.grad)
        _all_reduce_sum(total)
        if not (bool(torch.isfinite(total)) and bool(torch.isfinite(u.grad).all())):
            raise NonFiniteError(
                f"Non-finite energy or gradient at layer {self.layer!r}, vector {j + 1}: the "
                "ablated forward produced NaN/Inf. Check the model for overflow (e.g. run it "
                "in float32) or pick another layer."
            )
        if self.scale is None:
            start = abs(float(total))
            self.scale = max(start, self.floor) if max(start, self.floor) > 0 else 1.0
        u.grad /= self.scale
        return total / self.scale

    @torch.no_grad()
    def energy(self, v: Tensor) -> Tensor:
        """Mean KL over all inputs (and ranks) of ablating the unit direction ``v [d]``."""
        total = torch.zeros((), dtype=v.dtype, device=v.device)
        for b, x in self._nonempty():
            total += self._batch_kl(b, x, v)
        return _all_reduce_sum(total)


def _extract_layer(
    model: nn.Module,
    layer: str,
    batches: InputBatches,
    ref: _Reference,
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
    device = stats.mean.device
    ablation = Ablation(mode, stats.space, mean=stats.mean)
    objective = _Energy(model, layer, batches, ref, ablation, replay)
    eps = torch.finfo(stats.dtype).eps
    basis = torch.zeros(stats.dim, 0, dtype=stats.dtype, device=device)
    energies: list[Tensor] = []
    bar = _progress(k, f"causal basis {layer}", progress)
    hook = ablate(model, layer, ablation) if replay is None else nullcontext()
    with hook, closing(bar):
        for j in range(k):
            # Start from a standard basis vector off the span found so far (squared residual
            # 1 - ||row i of the basis||^2) along which the ablation moves h the most (a dead
            # channel would be a stationary point of zero energy).
            residual = (1 - basis.pow(2).sum(1)).clamp_min(0)
            score = residual * stats.spread if bool(stats.spread.any()) else residual
            start = int(score.argmax())
            # Energies far below the strongest one are noise for the loss scale.
            objective.start(floor=1e-3 * max((float(e) for e in energies), default=0.0))
            u = torch.zeros(stats.dim, dtype=stats.dtype, device=device)
            u[start] = 1.0
            u = _Energy.direction(u, basis).requires_grad_(True)
            optimiser = torch.optim.LBFGS(
                [u],
                lr=1.0,
                max_iter=max_iter,
                tolerance_grad=eps,
                tolerance_change=eps,
                line_search_fn="strong_wolfe",
            )
            optimiser.step(functools.partial(objective.loss_and_grad, u, basis, j))
            v = _Energy.direction(u.detach(), basis)
            energy = objective.energy(v)
            if not bool(torch.isfinite(energy)):
                raise NonFiniteError(
                    f"Non-finite energy at layer {layer!r}, vector {j + 1} after optimisation. "
                    "Check the model for overflow or pick another layer."
                )
            bar.update()
            bar.set_postfix_str(f"energy {float(energy):.3g}")
            if float(energy) < min_energy:
                break
            basis = torch.cat([basis, v.unsqueeze(1)], dim=1)
            energies.append(energy)
    values = torch.stack(energies) if energies else torch.zeros(0, dtype=stats.dtype, device=device)
    order = torch.argsort(values, descending=True)
    basis, values = basis[:, order].contiguous(), values[order].contiguous()
    if _distributed():  # the ranks took identical steps; make the result bitwise identical
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
def _tail_mismatch(replay: TailReplay, ref: _Reference) -> str | None:
    """Why the unpatched tail does not reproduce the model's outputs, or ``None`` if it does."""
    for b, lp in enumerate(ref.log_p):
        if not lp.numel():
            continue
        if not replay.recorded(b):
            return f"the layer did not run on batch {b}"
        lq = _log_probs(replay.unpatched(b))
        if lq.shape != lp.shape:
            return f"the tail's outputs have shape {tuple(lq.shape)}, the model's {tuple(lp.shape)}"
        if not torch.allclose(lq, lp, rtol=_TAIL_TOLERANCE, atol=_TAIL_TOLERANCE):
            gap = float((lq - lp).abs().nan_to_num(float("inf")).max())
            return f"the tail's outputs differ from the model's on batch {b} (max |log p gap| {gap:.3g})"
    return None


def _verified(
    replays: dict[str, TailReplay], specs: Sequence[str], ref: _Reference, tail: bool | None
) -> dict[str, TailReplay]:
    """The replays whose unpatched tail reproduces the model on every batch of every rank.

    Under DDP every rank takes part in one all-reduce per layer, with or without a replay, so
    that all ranks keep the same replays.
    """
    if tail is False:
        return {}
    kept: dict[str, TailReplay] = {}
    device = next(lp.device for lp in ref.log_p if lp.numel())
    for spec in specs:
        replay = replays.get(spec)
        reason = "no tail on this rank" if replay is None else _tail_mismatch(replay, ref)
        failed = _all_reduce_sum(torch.tensor([float(reason is not None)], device=device))
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
    batches = InputBatches(inputs, _model_device(model))
    with eval_mode(model), _frozen(model):
        replays = _tail_replays(model, specs, tail)  # traced in eval mode, as it will run
        try:
            ref = _reference_pass(model, specs, batches, space, mode, seed, replays)
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
