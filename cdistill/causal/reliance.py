"""Interventional measures of whether a model relies on a concept (docs/methods.md §5).

TCAV reads the sign of a local derivative along a concept direction; it says nothing about
whether the prediction *needs* the concept. These measures intervene instead:

* :func:`concept_ablation`: mean-ablate the concept subspace at a layer (``h − P h + P h̄``,
  ``P`` the projector onto its span) and measure the mean ``KL(p || q)`` and the accuracy
  change, on all inputs and on the bias-aligned and bias-conflicting ones, beside the same
  ablation of a seeded random subspace of the same rank (the control: any ablation of ``r``
  dimensions moves the output somewhat).
* :func:`concept_only_agreement`: how often the model predicts, on images that hold only the
  concept (e.g. a coloured stroke without a digit), the class each concept value points to.
* :func:`causal_alignment`: principal angles between the concept subspace and the top causal
  directions of the layer (:func:`cdistill.causal.extract_causal_bases`) and the share of the
  causal energy that lies in the concept subspace.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cdistill.causal.ablation import (
    Ablation,
    ablate,
    check_mode,
    check_space,
    default_space,
    to_rows,
    watch,
)
from cdistill.causal.basis import _derangement, _log_probs, _model_device, _work_dtype
from cdistill.errors import CdistillError, NonFiniteError
from cdistill.utils.capture import eval_mode, resolve_module

#: Normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054
#: Input groups of :class:`ConceptAblation` (aligned / conflicting as in
#: :class:`cdistill.tasks.metrics.BiasGroupAccuracy`: ``bias == label`` / ``0 <= bias != label``).
GROUPS = ("all", "aligned", "conflicting")


@dataclass(frozen=True)
class AblationEffect:
    """What one ablation does to one group of inputs.

    Attributes:
        n: Inputs in the group.
        kl: Mean ``KL(p || q)`` (nats), ``p`` the unmodified and ``q`` the ablated output
            distribution (NaN for an empty group).
        acc_before: Accuracy without the ablation (NaN for an empty group).
        acc_after: Accuracy with it.
    """

    n: int
    kl: float
    acc_before: float
    acc_after: float

    @property
    def acc_drop(self) -> float:
        """``acc_before − acc_after`` (positive: the ablation costs accuracy)."""
        return self.acc_before - self.acc_after


@dataclass(frozen=True)
class ConceptAblation:
    """Result of :func:`concept_ablation`.

    Attributes:
        layer: The layer spec.
        space: ``position`` or ``flatten`` (see :mod:`cdistill.causal.ablation`).
        mode: ``mean``, ``zero`` or ``resample``.
        rank: Dimension of the ablated span (the subspace's numerical rank).
        concept: Group (:data:`GROUPS`; ``aligned``/``conflicting`` only when the batches carry
            ``bias``) -> effect of ablating the concept subspace.
        control: The same for a random subspace of the same rank.
    """

    layer: str
    space: str
    mode: str
    rank: int
    concept: Mapping[str, AblationEffect]
    control: Mapping[str, AblationEffect]


@dataclass(frozen=True)
class Agreement:
    """Result of :func:`concept_only_agreement`.

    Attributes:
        rate: Share of concept images predicted as their value's class.
        lo: Lower end of the Wilson 95% interval of ``rate``.
        hi: Upper end.
        chance: ``1 / num_classes`` (a model that ignores the images and guesses uniformly).
        n: Images scored.
        successes: Images predicted as their value's class.
    """

    rate: float
    lo: float
    hi: float
    chance: float
    n: int
    successes: int


@dataclass(frozen=True)
class CausalAlignment:
    """Result of :func:`causal_alignment`.

    Attributes:
        cosines: ``[min(k', r')]`` cosines of the principal angles between the causal span and
            the concept span, descending (1: a shared direction, 0: orthogonal).
        shares: ``[k]`` ``||P v_i||²`` of each causal direction (``P``: projector onto the
            concept span).
        share: ``Σ e_i ||P v_i||² / Σ e_i``: the energy-weighted share of the causal
            directions inside the concept span (NaN when the energies sum to 0).
    """

    cosines: Tensor
    shares: Tensor
    share: float


def orthonormal_span(subspace: Tensor, what: str = "subspace") -> Tensor:
    """Orthonormal columns ``[d, r']`` (float64) spanning the columns of ``subspace [d, r]``.

    ``r'`` is the numerical rank: singular values under ``max(d, r) · eps · s_max`` (eps of the
    input's dtype) are dropped, so nearly parallel columns (two CAVs of one concept) count once.

    Raises:
        CdistillError: ``subspace`` is not ``[d]`` or ``[d, r]``, holds NaN/Inf, or is zero.
    """
    if subspace.ndim == 1:
        subspace = subspace[:, None]
    if subspace.ndim != 2 or subspace.numel() == 0:
        raise CdistillError(
            f"The {what} has shape {tuple(subspace.shape)}; pass its directions as the columns of a [d, r] tensor."
        )
    if not bool(torch.isfinite(subspace).all()):
        raise NonFiniteError(f"The {what} holds NaN/Inf: check the vectors it was built from.")
    u, s, _ = torch.linalg.svd(subspace.detach().double(), full_matrices=False)
    eps = torch.finfo(subspace.dtype if subspace.is_floating_point() else torch.float64).eps
    rank = int((s > max(subspace.shape) * eps * s[0]).sum()) if float(s[0]) > 0 else 0
    if rank == 0:
        raise CdistillError(f"The {what} is zero: it spans no direction. Pass non-zero vectors.")
    return u[:, :rank]


def random_subspace(dim: int, rank: int, seed: int) -> Tensor:
    """Orthonormal columns ``[dim, rank]`` (float64) of a uniformly random ``rank``-dim subspace."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, rank, generator=gen, dtype=torch.float64))
    return q


def _unpack(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(image, label, bias or None)`` of a mapping ``{"image", "label"[, "bias"]}`` or a tuple."""
    if isinstance(batch, Mapping):
        if "image" not in batch or "label" not in batch:
            raise CdistillError(
                f"A batch has keys {sorted(map(str, batch))}; concept_ablation needs 'image' and 'label' "
                "(and 'bias' for the aligned/conflicting split)."
            )
        return batch["image"], torch.as_tensor(batch["label"]), batch.get("bias")
    if isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        return batch[0], torch.as_tensor(batch[1]), batch[2] if len(batch) == 3 else None
    raise CdistillError(
        f"A batch is a {type(batch).__name__}; concept_ablation needs mappings {{'image', 'label'[, 'bias']}} "
        "or (image, label[, bias]) tuples, or a Dataset of such samples."
    )


def _batches(data: Dataset[Any] | Iterable[Any], batch_size: int) -> Iterable[Any]:
    """A Dataset is batched in order; anything else must already be re-iterable batches."""
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    if iter(data) is data:
        raise CdistillError(
            "The data is a one-shot iterator, but concept_ablation passes over it twice (the mean "
            "activation first). Pass a Dataset, a list of batches or a DataLoader."
        )
    return data


class _Mean:
    """Streaming float64 mean row of one layer (read inside the hook, see :func:`watch`)."""

    def __init__(self, space: str | None) -> None:
        self.space = space
        self.dtype = torch.float32
        self.sum: Tensor | None = None
        self.rows = 0

    def __call__(self, act: Tensor) -> None:
        if self.space is None:
            self.space = default_space(act)
        self.dtype = act.dtype
        rows = to_rows(act.detach(), self.space)
        rows = rows.reshape(-1, rows.shape[-1]).double()
        self.sum = rows.sum(0) if self.sum is None else self.sum + rows.sum(0)
        self.rows += rows.shape[0]


class _Tally:
    """Running sums of one ablation per group: inputs, KL, correct before and after."""

    def __init__(self) -> None:
        self.sums = {g: torch.zeros(4, dtype=torch.float64) for g in GROUPS}

    def add(self, masks: Mapping[str, Tensor], kl: Tensor, hit_before: Tensor, hit_after: Tensor) -> None:
        for group, m in masks.items():
            parts = [m.sum(), kl[m].sum(), hit_before[m].sum(), hit_after[m].sum()]
            self.sums[group] += torch.stack([t.double() for t in parts]).cpu()

    def effects(self, groups: Sequence[str]) -> dict[str, AblationEffect]:
        out = {}
        for group in groups:
            n, kl, before, after = self.sums[group].tolist()
            div = n if n > 0 else math.nan
            out[group] = AblationEffect(int(n), kl / div, before / div, after / div)
        return out


@torch.no_grad()
def concept_ablation(
    model: nn.Module,
    layer: str,
    subspace: Tensor,
    data: Dataset[Any] | Iterable[Any],
    *,
    space: str | None = None,
    mode: str = "mean",
    control_seed: int = 0,
    batch_size: int = 256,
) -> ConceptAblation:
    """Ablate the span of ``subspace`` at ``layer`` and measure what the output loses.

    Each row ``h`` of the layer (see :mod:`cdistill.causal.ablation` for rows and spaces) becomes
    ``h − P h + P r`` with ``P = V Vᵀ`` (``V``: :func:`orthonormal_span` of ``subspace``) and
    ``r`` the mean row over all inputs (``mean``), 0 (``zero``), or the row of another input
    of the batch (``resample``, a derangement seeded with ``control_seed``). The control
    ablates a random span of the same rank (seeded with ``control_seed``) the same way. Two
    streamed passes: the mean row, then per batch the unmodified, concept-ablated and
    control-ablated outputs. The model runs in eval mode (modes restored), on its device.

    Args:
        model: A classifier returning logits ``[B, K]`` (or an object with ``.logits``).
        layer: Module path (``"path:i"``: element ``i`` of a tuple output).
        subspace: ``[d, r]`` (or one direction ``[d]``), in the layer's row space: ``d`` is the
            channel count in ``position`` space, the activation size of a sample in ``flatten``.
        data: A Dataset of samples, or re-iterable batches (e.g. a DataLoader without
            shuffling): mappings ``{"image" [B, ...], "label" [B], "bias" [B] (optional)}`` or
            ``(image, label[, bias])`` tuples. With ``bias`` the effects are also reported on
            the aligned (``bias == label``) and conflicting (``0 <= bias != label``) inputs.
        space: ``position`` or ``flatten``; ``None``: ``position`` for maps and token
            sequences, ``flatten`` for vectors.
        mode: ``mean``, ``zero`` or ``resample``.
        control_seed: Seed of the random control subspace (and of resampling).
        batch_size: Samples per batch when ``data`` is a Dataset.

    Returns:
        A :class:`ConceptAblation`.

    Raises:
        CdistillError: An unknown layer, mode or space; a subspace of the wrong size, zero,
            or of full rank (nothing would be left to compare with the control); batches
            without images and labels; no inputs; a batch of one in ``resample`` mode.
    """
    check_mode(mode)
    check_space(space)
    resolve_module(model, layer)
    batches = _batches(data, batch_size)
    device = _model_device(model)
    with eval_mode(model):
        mean = _Mean(space)
        with watch(model, layer, mean):
            for batch in batches:
                x, _, _ = _unpack(batch)
                if len(x):
                    model(x.to(device))
        if mean.sum is None or mean.rows == 0 or mean.space is None:
            raise CdistillError(
                f"No inputs reached layer {layer!r}: the data is empty or the layer is not on the "
                "forward path. Pass at least one input and a layer the forward pass runs."
            )
        dim, work = mean.sum.shape[0], _work_dtype(mean.dtype)
        if subspace.shape[0] != dim:
            raise CdistillError(
                f"The subspace has {subspace.shape[0]} rows, but layer {layer!r} has rows of size {dim} in "
                f"{mean.space!r} space. Give directions in that space (or pass the space they were fitted in)."
            )
        concept = orthonormal_span(subspace, "concept subspace")
        rank = concept.shape[1]
        if rank >= dim:
            raise CdistillError(
                f"The concept subspace spans all {dim} dimensions of layer {layer!r}: its ablation removes "
                "everything, and a random control of the same rank would be the same. Pass fewer directions."
            )
        spans = {"concept": concept.to(device, work), "control": random_subspace(dim, rank, control_seed).to(device, work)}
        ablation = Ablation(mode, mean.space, mean=(mean.sum / mean.rows).to(device, work))
        tallies = {"concept": _Tally(), "control": _Tally()}
        gen = torch.Generator().manual_seed(control_seed)
        with_bias = False
        with ablate(model, layer, ablation):
            for batch in batches:
                x, label, bias = _unpack(batch)
                if len(x) == 0:
                    continue
                x, label = x.to(device), label.to(device).long()
                masks = {"all": torch.ones_like(label, dtype=torch.bool)}
                if bias is not None:
                    with_bias = True
                    bias = bias.to(device).long()
                    masks |= {"aligned": bias == label, "conflicting": (bias >= 0) & (bias != label)}
                if mode == "resample":
                    if len(x) < 2:
                        raise CdistillError("mode='resample' needs batches of at least 2 inputs; use a larger batch.")
                    ablation.source = _derangement(len(x), gen).to(device)
                ablation.direction = None
                log_p = _log_probs(model(x))
                hit = log_p.argmax(-1) == label
                for name, span in spans.items():
                    ablation.direction = span
                    log_q = _log_probs(model(x))
                    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
                    if not bool(torch.isfinite(kl).all()):
                        raise NonFiniteError(f"Non-finite KL after ablating the {name} subspace at {layer!r}.")
                    tallies[name].add(masks, kl, hit, log_q.argmax(-1) == label)
    groups = GROUPS if with_bias else ("all",)
    return ConceptAblation(layer, mean.space, mode, rank, tallies["concept"].effects(groups),
                           tallies["control"].effects(groups))


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for the default ``z``).

    With ``p̂ = successes / n``: centre ``(p̂ + z²/2n) / (1 + z²/n)``, half-width
    ``z / (1 + z²/n) · sqrt(p̂(1 − p̂)/n + z²/4n²)``; unlike the normal interval it stays in
    ``[0, 1]`` and is not empty at ``p̂ ∈ {0, 1}``.

    Raises:
        CdistillError: ``n < 1`` or ``successes`` outside ``[0, n]``.
    """
    if n < 1 or not 0 <= successes <= n:
        raise CdistillError(f"Wilson interval of {successes} successes in {n} trials: need n >= 1 and 0 <= successes <= n.")
    p, z2 = successes / n, z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At p̂ = 0 (1) the lower (upper) end is exactly 0 (1); rounding would leave ~1e-17.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


@torch.no_grad()
def concept_only_agreement(
    model: nn.Module,
    concept_images: Sequence[Tensor],
    classes: Sequence[int],
    *,
    batch_size: int = 256,
) -> Agreement:
    """How often the model predicts, on concept-only images, the class their value points to.

    A model that does not rely on the concept should answer such images (which hold no
    class evidence but the concept) near chance; one that learnt the shortcut answers
    ``classes[j]`` for value ``j``.

    Args:
        model: A classifier returning logits ``[B, K]`` (run in eval mode, modes restored).
        concept_images: Per concept value ``j``, preprocessed images ``[N_j, C, H, W]``.
        classes: ``classes[j]``: the class value ``j`` points to.
        batch_size: Images per forward pass.

    Returns:
        An :class:`Agreement` (Wilson 95% interval, chance ``1 / K``).

    Raises:
        CdistillError: ``classes`` and ``concept_images`` differ in length, or no images.
    """
    if len(concept_images) != len(classes):
        raise CdistillError(
            f"{len(concept_images)} concept values but {len(classes)} classes: give one class per value."
        )
    device = _model_device(model)
    n = successes = 0
    num_classes = 0
    with eval_mode(model):
        for images, k in zip(concept_images, classes, strict=True):
            for i in range(0, len(images), batch_size):
                log_p = _log_probs(model(images[i : i + batch_size].to(device)))
                num_classes = log_p.shape[-1]
                successes += int((log_p.argmax(-1) == int(k)).sum())
                n += len(log_p)
    if n == 0:
        raise CdistillError("No concept images to score: pass at least one image for some value.")
    lo, hi = wilson_interval(successes, n)
    return Agreement(successes / n, lo, hi, 1.0 / num_classes, n, successes)


def causal_alignment(basis: Tensor, subspace: Tensor, energies: Tensor) -> CausalAlignment:
    """How much of a layer's causal basis lies in a concept subspace.

    Args:
        basis: ``[d, k]`` causal directions (columns; :attr:`cdistill.causal.CausalBasis.basis`).
        subspace: ``[d, r]`` concept directions (e.g. the CAVs of each concept value).
        energies: ``[k]`` energy of each causal direction (:attr:`CausalBasis.energies`).

    Returns:
        A :class:`CausalAlignment`: principal-angle cosines (singular values of
        ``Q_basisᵀ Q_sub``) and the energy-weighted share ``Σ e_i ||P v_i||² / Σ e_i``.

    Raises:
        CdistillError: Mismatched sizes, zero columns in ``basis``, negative energies.
    """
    if basis.ndim != 2 or subspace.ndim not in (1, 2) or basis.shape[0] != subspace.shape[0]:
        raise CdistillError(
            f"The causal basis {tuple(basis.shape)} and the subspace {tuple(subspace.shape)} must be [d, k] "
            "and [d, r] with the same d (the same layer and space)."
        )
    e = energies.detach().double().cpu().reshape(-1)
    if e.shape[0] != basis.shape[1] or bool((e < 0).any()):
        raise CdistillError(f"Give one non-negative energy per basis column: {e.shape[0]} for {basis.shape[1]} columns.")
    v = basis.detach().double().cpu()
    norms = torch.linalg.vector_norm(v, dim=0)
    if bool((norms == 0).any()):
        raise CdistillError("The causal basis has a zero column: pass unit directions.")
    v = v / norms
    q_sub = orthonormal_span(subspace.cpu(), "concept subspace")
    cosines = torch.linalg.svdvals(orthonormal_span(v, "causal basis").T @ q_sub).clamp(0.0, 1.0)
    shares = (q_sub.T @ v).pow(2).sum(0)
    total = float(e.sum())
    share = float((e * shares).sum()) / total if total > 0 else math.nan
    return CausalAlignment(cosines, shares, share)
