"""Concept erasure inside a network: fit erasers on a layer's activations, apply them as hooks.

A layer's output is turned into feature rows ``[..., d]`` according to a *mode*:

* ``position``: a conv map ``[B, C, H, W]``; the C channels at every spatial position are one
  row (d = C), and every position of a sample carries that sample's concept label;
* ``flatten``: the whole map of a sample is one row (d = C*H*W);
* ``token``: a ViT output ``[B, T, C]``; every token is one row (d = C).

:func:`fit_layer_erasers` streams over data once per layer, *sequentially*: the erasers of
earlier layers are active while a later one is fitted, so each eraser sees the activations it
will be applied to. :func:`erase` applies them as forward hooks that replace the layer's
output, and always removes them on exit.

DDP: fitting is deterministic given the model and the batches, so the module fits on the whole
train split on every rank (no DistributedSampler, hence no padded duplicates) and then
broadcasts rank 0's buffers so that all ranks hold bitwise identical erasers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from cdistill.erasure.base import LowRankEraser
from cdistill.erasure.factory import METHODS, fit_eraser
from cdistill.erasure.leace import LeaceFitter
from cdistill.erasure.probe import fit_logistic, majority_rate
from cdistill.errors import CdistillError, unknown_name
from cdistill.utils.capture import eval_mode, resolve_module, stop_after

MODES = ("position", "flatten", "token")
Batch = Mapping[str, Tensor]


@dataclass(frozen=True)
class ErasureSpec:
    """How to erase a concept at one layer.

    Attributes:
        layer: Module path (see :func:`cdistill.utils.capture.resolve_module`).
        mode: ``position``, ``flatten`` or ``token`` (see the module docstring).
        method: Any :data:`cdistill.erasure.METHODS` name (``leace`` by default).
        concept: Batch key of the integer concept ids ``[B]`` (``bias``: the class the
            spurious cue points to); samples with id -1 are skipped.
        positive: ClArC only: the concept id that counts as "present" (ClArC erases a binary
            concept, z = (ids == positive)).
        options: Keyword options of the method (e.g. ``rank`` for RLACE).
        rows_per_sample: Methods that keep activations in memory (all but leace/orth) keep at
            most this many random positions/tokens per sample, to bound memory.
    """

    layer: str
    mode: str = "position"
    method: str = "leace"
    concept: str = "bias"
    positive: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    rows_per_sample: int = 8

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise unknown_name("erasure mode", self.mode, MODES, "Set erasure.mode to one of these.")
        if self.method not in METHODS:
            raise unknown_name("erasure method", self.method, METHODS, "Set erasure.method to one of these.")
        if self.method.endswith("clarc") and self.positive is None:
            raise CdistillError(
                f"erasure.method={self.method!r} erases a binary concept: set erasure.positive to "
                "the concept id that counts as present (e.g. 0)."
            )

    @property
    def streaming(self) -> bool:
        """True for methods fitted from streamed statistics (no activations kept)."""
        return self.method in ("leace", "orth")


def specs_from_config(cfg: Mapping[str, Any]) -> list[ErasureSpec]:
    """``{layers: [conv1], mode, method, concept, positive, options, rows_per_sample}`` -> specs.

    Other keys (``refit_every_n_steps``) belong to the caller and are ignored here.
    """
    layers = cfg.get("layers")
    if isinstance(layers, str):
        layers = [layers]
    if not layers:
        raise CdistillError("erasure.layers is empty: name at least one layer, e.g. [conv1].")
    keys = ("mode", "method", "concept", "positive", "rows_per_sample")
    common = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    options = dict(cfg.get("options") or {})
    return [ErasureSpec(layer=str(layer), options=options, **common) for layer in layers]


# ---------------------------------------------------------------------------- reshaping
def to_rows(x: Tensor, mode: str, layer: str) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """View a layer output as feature rows and return the inverse reshape.

    Args:
        x: ``[B, C, H, W]`` (``position``, also ``[B, C, L]``), ``[B, ...]`` (``flatten``) or
            ``[B, T, C]`` (``token``).
        mode: One of :data:`MODES`.
        layer: Layer name, for messages.

    Returns:
        ``rows [B, ..., d]`` and a function mapping erased rows back to ``x``'s shape.
    """
    if mode == "position":
        if x.ndim < 3:
            raise CdistillError(
                f"Layer {layer!r} outputs shape {tuple(x.shape)}; mode 'position' needs a map "
                "[B, C, H, W]. Use mode 'flatten' for vectors [B, d] or 'token' for [B, T, C]."
            )
        return x.movedim(1, -1), lambda r: r.movedim(-1, 1)
    if mode == "flatten":
        shape = x.shape
        return x.reshape(shape[0], -1), lambda r: r.reshape(shape)
    if mode == "token":
        if x.ndim != 3:
            raise CdistillError(
                f"Layer {layer!r} outputs shape {tuple(x.shape)}; mode 'token' needs [B, T, C]."
            )
        return x, lambda r: r
    raise unknown_name("erasure mode", mode, MODES, "Set erasure.mode to one of these.")


def _tensor_output(layer: str, output: Any) -> Tensor:
    if isinstance(output, (tuple, list)):
        raise CdistillError(
            f"Layer {layer!r} returns a {type(output).__name__} of {len(output)} elements; erasure "
            "needs a module that returns one tensor. Pick that submodule (e.g. the block's "
            "output projection) instead."
        )
    if not isinstance(output, Tensor):
        raise CdistillError(f"Layer {layer!r} returns {type(output).__name__}, not a tensor.")
    return output


def _check_dim(layer: str, mode: str, rows: Tensor, eraser: nn.Module) -> None:
    dim = getattr(eraser, "dim", None)
    if dim is not None and rows.shape[-1] != dim:
        raise CdistillError(
            f"The eraser of layer {layer!r} was fitted on d={dim} features, but in mode "
            f"{mode!r} the layer gives d={rows.shape[-1]} (rows {tuple(rows.shape)}). Refit the "
            "eraser, or use the mode it was fitted with."
        )


# ---------------------------------------------------------------------------- applying
def erasing_hook(layer: str, eraser: nn.Module, mode: str) -> Callable[..., Tensor]:
    """The forward hook that replaces ``layer``'s output by its erased output (see :func:`erase`)."""

    def hook(module: nn.Module, inputs: Any, output: Any) -> Tensor:
        out = _tensor_output(layer, output)
        if mode == "position" and isinstance(eraser, LowRankEraser) and out.ndim >= 3:
            _check_dim(layer, mode, out.movedim(1, -1), eraser)
            return eraser.erase_channels(out)  # in place of movedim: see erase_channels
        rows, back = to_rows(out, mode, layer)
        _check_dim(layer, mode, rows, eraser)
        return back(eraser(rows))  # the eraser returns the activation's dtype

    return hook


@contextmanager
def erase(
    model: nn.Module, erasers: Mapping[str, nn.Module], mode: str | Mapping[str, str] = "position"
) -> Iterator[None]:
    """Replace the outputs of the named layers by their erased outputs inside the block.

    Example::

        with erase(model, {"conv1": eraser}, "position"):
            logits = model(x)

    Args:
        model: The network.
        erasers: Layer path -> eraser mapping ``[..., d] -> [..., d]`` (e.g. an
            ``nn.ModuleDict`` keyed by :func:`eraser_key`, or a plain dict of paths).
        mode: One mode for every layer, or layer -> mode.

    Raises:
        CdistillError: Unknown layer (close names are listed), a layer returning a tuple, or
            a feature dimension that does not match its eraser.
    """
    # Resolve every layer before registering anything, so a bad name leaves no hooks.
    targets = [(layer, resolve_module(model, layer), eraser) for layer, eraser in erasers.items()]
    handles: list[RemovableHandle] = []
    try:
        for layer, module, eraser in targets:
            layer_mode = mode if isinstance(mode, str) else mode[layer]
            handles.append(module.register_forward_hook(erasing_hook(layer, eraser, layer_mode)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def eraser_key(layer: str) -> str:
    """``nn.ModuleDict`` key of a layer path (module names may not contain dots)."""
    return layer.replace(".", "__")


# ---------------------------------------------------------------------------- fitting
def _layer_rows(
    model: nn.Module, layer: str, mode: str, x: Tensor, active: Mapping[str, nn.Module], modes: Mapping[str, str]
) -> Tensor:
    """Rows ``[B, ..., d]`` of ``layer`` for inputs ``x``, with the ``active`` erasers applied."""
    module = resolve_module(model, layer)
    seen: list[Tensor] = []

    def grab(mod: nn.Module, inputs: Any, output: Any) -> None:
        seen.append(_tensor_output(layer, output).detach())

    # Registered after the erasure hooks: at an erased layer it sees the erased output.
    with erase(model, active, dict(modes)):
        handle = module.register_forward_hook(grab)
        try:
            with stop_after(module):  # after grab: the rest of the network is skipped
                model(x)
        finally:
            handle.remove()
    if not seen:
        raise CdistillError(f"Layer {layer!r} did not run in the forward pass; is it on the path?")
    return to_rows(seen[0], mode, layer)[0]


def _labels(batch: Batch, spec: ErasureSpec, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Keep samples with a concept id >= 0; return ``rows [M, d]`` and ``z [M]`` (per row)."""
    if spec.concept not in batch:
        raise unknown_name("batch key", spec.concept, list(batch), "Set erasure.concept to one of these.")
    ids = batch[spec.concept].to(rows.device)
    keep = ids >= 0
    rows, ids = rows[keep], ids[keep]
    z = ids.view(-1, *([1] * (rows.ndim - 2))).expand(rows.shape[:-1])  # each position: its sample's id
    return rows.reshape(-1, rows.shape[-1]), z.reshape(-1)


def _subsample(rows: Tensor, per_sample: int, gen: torch.Generator) -> Tensor:
    """At most ``per_sample`` random positions/tokens of each sample: ``[B, P, d] -> [B, p, d]``."""
    if rows.ndim == 2 or rows[0, ..., 0].numel() <= per_sample:
        return rows
    flat = rows.reshape(rows.shape[0], -1, rows.shape[-1])
    pick = torch.rand(flat.shape[:2], generator=gen).argsort(1)[:, :per_sample].to(rows.device)
    return flat.gather(1, pick[..., None].expand(-1, -1, flat.shape[-1]))


@torch.no_grad()
def fit_layer_erasers(
    model: nn.Module,
    specs: Sequence[ErasureSpec],
    batches: Iterable[Batch],
    num_classes: int,
    *,
    device: torch.device | str | None = None,
    reduce: Callable[[LeaceFitter], object] | None = None,
) -> dict[str, LowRankEraser]:
    """Fit one eraser per spec, in order, each with the earlier ones active.

    The model runs in eval mode (restored per module afterwards) and only up to the layer
    being fitted. LEACE/orth stream statistics (:meth:`LeaceFitter.update` per batch); other
    methods keep ``rows_per_sample`` rows per sample and fit once.

    Args:
        model: The network.
        specs: One :class:`ErasureSpec` per layer, in forward order.
        batches: Re-iterable batches (a DataLoader or a list), dicts with ``image [B, ...]``
            and the spec's concept key ``[B]``; iterated once per spec.
        num_classes: Number of concept ids (ids lie in ``[0, num_classes)``, -1 = none).
        device: Where inputs go (default: the model's parameters' device).
        reduce: Called on each streaming fitter after its pass and before ``build()``, e.g.
            ``LeaceFitter.all_reduce_`` when every DDP rank streamed its own shard (every rank
            must then call this function, with at least one batch each).

    Returns:
        Layer path -> fitted eraser (float64 buffers), in spec order.
    """
    if len(specs) > 1 and iter(batches) is batches:
        raise CdistillError("batches is a one-shot iterator; pass a DataLoader or a list (one pass per layer).")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modes = {s.layer: s.mode for s in specs}
    fitted: dict[str, LowRankEraser] = {}
    with eval_mode(model):
        for spec in specs:
            fitted[spec.layer] = _fit_one(model, spec, batches, num_classes, device, fitted, modes, reduce)
    return fitted


def _fit_one(
    model: nn.Module,
    spec: ErasureSpec,
    batches: Iterable[Batch],
    num_classes: int,
    device: torch.device | str,
    active: Mapping[str, nn.Module],
    modes: Mapping[str, str],
    reduce: Callable[[LeaceFitter], object] | None = None,
) -> LowRankEraser:
    fitter: LeaceFitter | None = None
    kept: list[tuple[Tensor, Tensor]] = []
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        rows = _layer_rows(model, spec.layer, spec.mode, batch["image"].to(device), active, modes)
        if not spec.streaming:
            rows = _subsample(rows, spec.rows_per_sample, gen)
        x, z = _labels(batch, spec, rows)
        if spec.streaming:
            if fitter is None:
                fitter = LeaceFitter(x.shape[-1], num_classes=num_classes, method=spec.method,  # type: ignore[arg-type]
                                     device=x.device, **dict(spec.options))
            fitter.update(x, z)
        else:
            kept.append((x.cpu(), z.cpu()))
    if spec.streaming:
        if fitter is not None and reduce is not None:
            reduce(fitter)
        if fitter is None or fitter.count < 2:
            raise CdistillError(f"No samples with a {spec.concept!r} id >= 0 to fit the eraser of {spec.layer!r}.")
        return fitter.build()
    if not kept:
        raise CdistillError(f"No samples with a {spec.concept!r} id >= 0 to fit the eraser of {spec.layer!r}.")
    x = torch.cat([k[0] for k in kept])
    z = torch.cat([k[1] for k in kept])
    if spec.positive is not None:
        z = (z == spec.positive).long()
        return fit_eraser(spec.method, x, z, 2, **dict(spec.options))
    return fit_eraser(spec.method, x, z, num_classes, **dict(spec.options))


# ---------------------------------------------------------------------------- measuring
def bias_probe_accuracy(
    model: nn.Module,
    layer: str,
    mode: str,
    batches: Iterable[Batch],
    num_classes: int,
    *,
    erasers: Mapping[str, nn.Module] | None = None,
    modes: Mapping[str, str] | None = None,
    concept: str = "bias",
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Held-out accuracy of a fresh linear probe for the concept at ``layer``.

    Features per sample: the mean over positions/tokens of the rows (``position``/``token``;
    linear erasure of every row also removes linear information from their mean) or the
    flattened map. The probe is fitted on the first half of the samples and scored on the
    second half; use data the erasers were not fitted on (e.g. the ``val`` split).

    Args:
        model: The network.
        layer: Layer to probe.
        mode: Its erasure mode.
        batches: Batches with ``image`` and ``concept``.
        num_classes: Number of concept ids.
        erasers: Erasers to apply while probing (None: the unerased model).
        modes: Layer -> mode of ``erasers`` (default: ``mode`` for all).
        concept: Batch key of the concept ids.
        device: Where inputs go (default: the model's device).

    Returns:
        ``acc`` (probe accuracy on the held-out half) and ``chance`` (its majority rate).
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    active = dict(erasers or {})
    layer_modes = dict(modes or {k: mode for k in active})
    spec = ErasureSpec(layer=layer, mode=mode, concept=concept)
    feats, ids = [], []
    with eval_mode(model):
        for batch in batches:
            with torch.no_grad():
                rows = _layer_rows(model, layer, mode, batch["image"].to(device), active, layer_modes)
            keep = batch[spec.concept].to(rows.device) >= 0
            pooled = rows.reshape(rows.shape[0], -1, rows.shape[-1]).mean(1)
            feats.append(pooled[keep].float().cpu())
            ids.append(batch[spec.concept][keep.cpu()])
    # Lightning tests under inference mode; the probe needs autograd (on plain copies).
    with torch.inference_mode(False), torch.enable_grad():
        x, z = torch.cat(feats).clone(), torch.cat(ids).long().clone()
        half = len(z) // 2
        if half < 2:
            raise CdistillError(f"Too few samples with a {concept!r} id to probe layer {layer!r}: {len(z)}.")
        probe = fit_logistic(x[:half], z[:half], num_classes)
        return {"acc": probe.accuracy(x[half:], z[half:]), "chance": majority_rate(z[half:])}
