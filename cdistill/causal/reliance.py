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

:func:`concept_ablation` lives in :mod:`cdistill.causal.intervention` and the subspace bases in
:mod:`cdistill.causal.subspace`; both are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cdistill.causal.common import log_probs, model_device
from cdistill.causal.intervention import GROUPS, AblationEffect, ConceptAblation, concept_ablation
from cdistill.causal.subspace import orthonormal_span, random_subspace
from cdistill.errors import CdistillError
from cdistill.utils.capture import eval_mode

__all__ = [
    "GROUPS",
    "Z95",
    "AblationEffect",
    "Agreement",
    "CausalAlignment",
    "ConceptAblation",
    "causal_alignment",
    "concept_ablation",
    "concept_only_agreement",
    "orthonormal_span",
    "random_subspace",
    "wilson_interval",
]

#: Normal quantile of a two-sided 95% interval.
Z95 = 1.959963984540054


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
    device = model_device(model)
    n = successes = 0
    num_classes = 0
    with eval_mode(model):
        for images, k in zip(concept_images, classes, strict=True):
            for i in range(0, len(images), batch_size):
                log_p = log_probs(model(images[i : i + batch_size].to(device)))
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
