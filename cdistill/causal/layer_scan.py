"""Where to measure reliance on a concept (docs/methods.md §5): the layer where it is *used*.

A concept can be linearly readable at a layer (its CAVs separate) without the output depending
on it there: the faces proxy's gender cue is readable at the stem, but it is a shape that only
later layers turn into a feature the head reads, so ablating the gender subspace at the stem
moves the output by ~3e-4 nats. :func:`reliance_layer_scan` therefore chooses, among candidate
layers, the one where mean-ablating the concept subspace (the span of its CAVs there) moves the
model's output most *net of the control*: ``ablation_kl − control_kl``, the control being a
seeded random subspace of the same rank ablated the same way (any ablation of ``r`` dimensions
moves the output somewhat, more at a narrow layer). The earliest candidate wins a tie.

The rule is meant for the model training starts from (the base model): the layer is then fixed
before any fine-tuning, and the model before and after is measured at the same place. Each
candidate is one :func:`~cdistill.causal.intervention.concept_ablation`; nothing else is
computed (no causal basis), so a scan costs about four forward passes per input and candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn
from torch.utils.data import Dataset

from cdistill.causal.ablation import check_mode, check_space
from cdistill.causal.intervention import AblationOptions, concept_ablation
from cdistill.errors import CdistillError

if TYPE_CHECKING:  # only an annotation (typing.Unpack is 3.11+, the package supports 3.10)
    from typing_extensions import Unpack

__all__ = ["LayerScore", "RelianceLayerScan", "reliance_layer_scan"]


@dataclass(frozen=True)
class LayerScore:
    """One candidate of :func:`reliance_layer_scan`.

    Attributes:
        layer: Module path.
        rank: Dimension of the ablated concept span (0 when it could not be measured).
        ablation_kl: Mean ``KL(p || q)`` (nats) when the concept span is ablated (NaN: not measured).
        control_kl: The same for the random span of the same rank.
        error: Why the candidate could not be measured (``""`` when it was).
    """

    layer: str
    rank: int
    ablation_kl: float
    control_kl: float
    error: str = ""

    @property
    def net_kl(self) -> float:
        """``ablation_kl − control_kl``: what the concept span moves beyond any span of its rank."""
        return self.ablation_kl - self.control_kl

    @property
    def measured(self) -> bool:
        """Whether the candidate was measured and its net KL is finite."""
        return not self.error and math.isfinite(self.net_kl)


@dataclass(frozen=True)
class RelianceLayerScan:
    """Result of :func:`reliance_layer_scan`.

    Attributes:
        layer: The chosen candidate (largest net KL, the earliest on ties).
        scores: One :class:`LayerScore` per candidate, in the candidates' order.
        mode: The ablation (``mean``, ``zero`` or ``resample``).
    """

    layer: str
    scores: tuple[LayerScore, ...]
    mode: str

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON: the choice, the rule and every candidate with its net KL."""
        rows = [asdict(s) | {"net_kl": s.net_kl, "measured": s.measured} for s in self.scores]
        return {"layer": self.layer, "rule": "max ablation_kl - control_kl over the candidates, earliest on ties",
                "mode": self.mode, "candidates": [s.layer for s in self.scores], "scores": rows}

    def table(self) -> str:
        """Markdown: one row per candidate, the chosen one marked."""
        lines = ["| layer | rank | ablation KL | control KL | net KL |", "|---|---|---|---|---|"]
        for s in self.scores:
            mark = " (chosen)" if s.layer == self.layer else ""
            cells = (f"{s.rank} | {s.ablation_kl:.4g} | {s.control_kl:.4g} | {s.net_kl:.4g}" if s.measured
                     else f"- | - | - | not measured: {s.error}")
            lines.append(f"| {s.layer}{mark} | {cells} |")
        return "\n".join(lines)


def _score(model: nn.Module, layer: str, subspace: Mapping[str, Tensor] | Callable[[str], Tensor],
           data: Dataset[Any] | Iterable[Any], kw: AblationOptions) -> LayerScore:
    """One candidate's :class:`LayerScore`; a :class:`CdistillError` (no subspace there, a span
    of full rank, a layer the forward pass does not run) is recorded, not raised."""
    try:
        vectors = subspace(layer) if callable(subspace) else subspace[layer]
        res = concept_ablation(model, layer, vectors, data, **kw)
    except (CdistillError, KeyError) as err:
        reason = f"no concept subspace given for {layer!r}" if isinstance(err, KeyError) else str(err)
        return LayerScore(layer, 0, math.nan, math.nan, reason.splitlines()[0])
    return LayerScore(layer, res.rank, res.concept["all"].kl, res.control["all"].kl)


def reliance_layer_scan(
    model: nn.Module,
    candidates: Sequence[str],
    subspace: Mapping[str, Tensor] | Callable[[str], Tensor],
    data: Dataset[Any] | Iterable[Any],
    **options: Unpack[AblationOptions],
) -> RelianceLayerScan:
    """Choose the candidate layer where ablating the concept subspace moves the output most.

    For each candidate, :func:`~cdistill.causal.intervention.concept_ablation` ablates the
    concept span there and a random span of the same rank; the score is the difference of
    their mean KLs (see the module docstring). Candidates that cannot be measured are listed
    with the reason and never chosen.

    Args:
        model: A classifier returning logits ``[B, K]``; pass the base model (the one
            fine-tuning starts from). Run in eval mode, its modes restored.
        candidates: Module paths in forward order (e.g.
            :func:`cdistill.models.layers.candidate_layers`); the earliest wins a tie.
        subspace: Layer -> ``[d, r]`` concept directions in that layer's row space (e.g. one
            CAV per concept value), as a mapping or a function; a function may raise
            :class:`CdistillError` for a layer where none can be fitted.
        data: Inputs, as :func:`concept_ablation` takes them (a Dataset, or re-iterable
            batches ``{"image" [B, ...], "label" [B], "bias" [B]}``).
        **options: :func:`concept_ablation`'s keywords, passed on to it: ``space``
            (``position`` or ``flatten``, the CAVs' row space; default per layer), ``mode``
            (``mean``, ``zero`` or ``resample``; default ``mean``), ``control_seed``,
            ``batch_size``.

    Returns:
        A :class:`RelianceLayerScan` (the choice and every candidate's score).

    Raises:
        CdistillError: No candidates, an unknown mode or space, or no candidate could be
            measured (the reasons are listed).
    """
    mode = options.get("mode", "mean")
    check_mode(mode)  # a wrong setting fails once, not as every candidate's reason
    check_space(options.get("space"))
    if not candidates:
        raise CdistillError("No candidate layers to scan: pass module paths (e.g. candidate_layers(model)).")
    scores = tuple(_score(model, layer, subspace, data, options) for layer in candidates)
    best: LayerScore | None = None
    for s in scores:  # strictly greater: the earliest candidate keeps a tie
        if s.measured and (best is None or s.net_kl > best.net_kl):
            best = s
    if best is None:
        reasons = "\n".join(f"  {s.layer}: {s.error or 'non-finite KL'}" for s in scores)
        raise CdistillError(
            f"The reliance layer rule could measure no candidate layer:\n{reasons}\nFix the cause above, or "
            "name the layer (measure.reliance.layer=<module path>)."
        )
    return RelianceLayerScan(best.layer, scores, mode)
