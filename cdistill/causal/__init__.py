"""Causal basis extraction (docs/methods.md §5): the directions of a layer's activation that
the model's output depends on most, found by maximising the KL divergence of their ablation.

:func:`extract_causal_bases` returns one :class:`CausalBasis` per layer;
:mod:`cdistill.causal.ablation` holds the ablation hook it patches the layer with.
"""

from cdistill.causal.basis import CausalBasis, extract_causal_bases

__all__ = ["CausalBasis", "extract_causal_bases"]
