"""Concept ablation (docs/methods.md §5): what the output loses when a concept subspace is ablated.

:func:`concept_ablation` mean-ablates the concept subspace at a layer (``h − P h + P h̄``, ``P``
the projector onto its span) and measures the mean ``KL(p || q)`` and the accuracy change, on
all inputs and on the bias-aligned and bias-conflicting ones, beside the same ablation of a
seeded random subspace of the same rank (the control: any ablation of ``r`` dimensions moves
the output somewhat). Part of the reliance measures (:mod:`cdistill.causal.reliance`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cdistill.causal.ablation import Ablation, ablate, check_mode, check_space, watch
from cdistill.causal.common import RowMoments, derangement, log_probs, model_device, work_dtype
from cdistill.causal.subspace import orthonormal_span, random_subspace
from cdistill.errors import CdistillError, NonFiniteError
from cdistill.utils.capture import eval_mode, resolve_module

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


def unpack_batch(batch: Any) -> tuple[Tensor, Tensor, Tensor | None]:
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



def _layer_mean(
    model: nn.Module, layer: str, batches: Iterable[Any], space: str | None, device: torch.device
) -> tuple[Tensor, str, torch.dtype]:
    """First pass: ``(mean row [d] float64, space, the layer's dtype)`` over all inputs."""
    moments = RowMoments(layer, space)
    with watch(model, layer, moments):
        for batch in batches:
            x, _, _ = unpack_batch(batch)
            if len(x):
                model(x.to(device))
    if moments.sum is None or moments.rows == 0 or moments.space is None:
        raise CdistillError(
            f"No inputs reached layer {layer!r}: the data is empty or the layer is not on the "
            "forward path. Pass at least one input and a layer the forward pass runs."
        )
    return moments.sum / moments.rows, moments.space, moments.dtype


def _concept_span(subspace: Tensor, dim: int, layer: str, space: str) -> Tensor:
    """:func:`orthonormal_span` of ``subspace``, checked against the layer's row size ``dim``."""
    if subspace.shape[0] != dim:
        raise CdistillError(
            f"The subspace has {subspace.shape[0]} rows, but layer {layer!r} has rows of size {dim} in "
            f"{space!r} space. Give directions in that space (or pass the space they were fitted in)."
        )
    concept = orthonormal_span(subspace, "concept subspace")
    if concept.shape[1] >= dim:
        raise CdistillError(
            f"The concept subspace spans all {dim} dimensions of layer {layer!r}: its ablation removes "
            "everything, and a random control of the same rank would be the same. Pass fewer directions."
        )
    return concept


def _groups(label: Tensor, bias: Tensor | None) -> dict[str, Tensor]:
    """Group -> ``[B]`` mask: all inputs, and with ``bias`` the aligned and conflicting ones."""
    masks = {"all": torch.ones_like(label, dtype=torch.bool)}
    if bias is not None:
        masks |= {"aligned": bias == label, "conflicting": (bias >= 0) & (bias != label)}
    return masks


def _ablated_pass(
    model: nn.Module,
    layer: str,
    batches: Iterable[Any],
    ablation: Ablation,
    spans: Mapping[str, Tensor],
    seed: int,
    device: torch.device,
) -> tuple[dict[str, _Tally], bool]:
    """Second pass: per span, the tallies of its ablation; and whether the batches carry ``bias``."""
    tallies = {name: _Tally() for name in spans}
    gen = torch.Generator().manual_seed(seed)
    with_bias = False
    with ablate(model, layer, ablation):
        for batch in batches:
            x, label, bias = unpack_batch(batch)
            if len(x) == 0:
                continue
            x, label = x.to(device), label.to(device).long()
            with_bias |= bias is not None
            masks = _groups(label, None if bias is None else bias.to(device).long())
            if ablation.mode == "resample":
                if len(x) < 2:
                    raise CdistillError("mode='resample' needs batches of at least 2 inputs; use a larger batch.")
                ablation.source = derangement(len(x), gen).to(device)
            ablation.direction = None
            log_p = log_probs(model(x))
            hit = log_p.argmax(-1) == label
            for name, span in spans.items():
                ablation.direction = span
                log_q = log_probs(model(x))
                kl = (log_p.exp() * (log_p - log_q)).sum(-1)
                if not bool(torch.isfinite(kl).all()):
                    raise NonFiniteError(f"Non-finite KL after ablating the {name} subspace at {layer!r}.")
                tallies[name].add(masks, kl, hit, log_q.argmax(-1) == label)
    return tallies, with_bias


class AblationOptions(TypedDict, total=False):
    """The keyword options of :func:`concept_ablation`, for callers that pass them on."""

    space: str | None
    mode: str
    control_seed: int
    batch_size: int


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
    device = model_device(model)
    with eval_mode(model):
        mean, row_space, dtype = _layer_mean(model, layer, batches, space, device)
        dim, work = mean.shape[0], work_dtype(dtype)
        concept = _concept_span(subspace, dim, layer, row_space)
        rank = concept.shape[1]
        control = random_subspace(dim, rank, control_seed)
        spans = {"concept": concept.to(device, work), "control": control.to(device, work)}
        ablation = Ablation(mode, row_space, mean=mean.to(device, work))
        tallies, with_bias = _ablated_pass(model, layer, batches, ablation, spans, control_seed, device)
    groups = GROUPS if with_bias else ("all",)
    return ConceptAblation(layer, row_space, mode, rank, tallies["concept"].effects(groups),
                           tallies["control"].effects(groups))
