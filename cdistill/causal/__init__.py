"""Causal basis extraction (docs/methods.md §5): the directions of a layer's activation that
the model's output depends on most, found by maximising the KL divergence of their ablation.

:func:`extract_causal_bases` (:mod:`cdistill.causal.basis`) returns one :class:`CausalBasis` per
layer, from a first pass (:mod:`cdistill.causal.reference`), the ablation energy
(:mod:`cdistill.causal.energy`) and a greedy L-BFGS search on the sphere
(:mod:`cdistill.causal.sphere`); :mod:`cdistill.causal.ablation` holds the ablation hook it
patches the layer with; :mod:`cdistill.causal.tail` the replay of only the part of the model after
the layer; :mod:`cdistill.causal.reliance` the interventional reliance measures (concept ablation,
:mod:`cdistill.causal.intervention`; concept-only agreement; causal alignment);
:mod:`cdistill.causal.layer_scan` the rule that picks the layer to measure them at.
"""

from cdistill.causal.basis import CausalBasis, extract_causal_bases
from cdistill.causal.layer_scan import LayerScore, RelianceLayerScan, reliance_layer_scan
from cdistill.causal.reliance import (
    AblationEffect,
    Agreement,
    CausalAlignment,
    ConceptAblation,
    causal_alignment,
    concept_ablation,
    concept_only_agreement,
    wilson_interval,
)

__all__ = [
    "AblationEffect",
    "Agreement",
    "CausalAlignment",
    "CausalBasis",
    "ConceptAblation",
    "LayerScore",
    "RelianceLayerScan",
    "causal_alignment",
    "concept_ablation",
    "concept_only_agreement",
    "extract_causal_bases",
    "reliance_layer_scan",
    "wilson_interval",
]
