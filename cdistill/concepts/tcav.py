"""TCAV: directional derivatives along CAVs, TCAV scores and their significance.

Sign convention (Kim et al. 2018): the directional derivative of a scalar target ``f`` at
layer activation ``a`` along a CAV ``v`` (pointing towards the concept) is

    S(x) = ∇_a f(x) · v,

so ``S > 0`` means that moving the activation towards the concept increases ``f``. The
TCAV score is the fraction of inputs with ``S > 0``; with ``f`` the class logit or
log-probability, a score near 1 says the concept pushes the model towards the class, near
0 away from it, and ~0.5 (like a random direction) says it does not matter. Significance
compares the scores of CAVs fitted against many random negative sets with scores of
random-vs-random CAVs by a two-sided t-test.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from cdistill.concepts.cav import DEFAULT_SOLVER, CAVResult, fit_cav, gate_cavs
from cdistill.errors import CdistillError, unknown_name
from cdistill.objective.losses import LOGIT_TARGETS
from cdistill.utils.capture import capture, eval_mode

TargetFn = Callable[[Tensor, Tensor, Tensor], Tensor]
#: The targets TCAV differentiates: the first two of :data:`cdistill.objective.losses.TARGETS`.
TARGETS = LOGIT_TARGETS[:2]


def _target_values(target: str | TargetFn, act: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample scalar target ``[B]``."""
    if callable(target):
        values = target(act, logits, labels)
        if values.shape != (act.shape[0],):
            raise CdistillError(
                f"A TCAV target callable must return one value per sample, shape "
                f"[{act.shape[0]}]; got {tuple(values.shape)}."
            )
        return values
    if target not in TARGETS:
        raise unknown_name("TCAV target", target, TARGETS, "Use a target name or a callable.")
    if logits.ndim != 2:
        raise CdistillError(
            f"TCAV target {target!r} needs logits of shape [B, classes], got "
            f"{tuple(logits.shape)}; pass a callable target for other outputs."
        )
    scores = torch.log_softmax(logits, dim=1) if target == "logprob" else logits
    return scores.gather(1, labels[:, None].to(logits.device)).squeeze(1)


def _labels(labels: Tensor | int | None, batch: int, target: str | TargetFn) -> Tensor:
    if labels is None:
        if not callable(target):
            raise CdistillError(f"TCAV target {target!r} needs labels (a class per input).")
        return torch.zeros(batch, dtype=torch.long)
    if isinstance(labels, int):
        return torch.full((batch,), labels, dtype=torch.long)
    if labels.shape[0] != batch:
        raise CdistillError(f"Got {labels.shape[0]} labels for {batch} inputs.")
    return labels


def target_gradients(
    model: nn.Module,
    layer: str,
    inputs: Tensor,
    labels: Tensor | int | None = None,
    target: str | TargetFn = "logprob",
    *,
    batch_size: int | None = None,
) -> Tensor:
    """Per-sample gradients ``∇_a f(x)`` of the target w.r.t. the layer activation.

    One forward with the activation made a grad-requiring leaf, then one
    ``torch.autograd.grad`` of the summed per-sample targets: the result is exact per
    sample because the model runs in eval mode (no batch-norm statistics couple samples).
    The model's train/eval mode is restored per module afterwards.

    Args:
        model: The model (frozen or not; its parameters get no gradients).
        layer: Layer spec (see :func:`cdistill.utils.capture.capture`).
        inputs: Inputs ``[B, ...]`` (moved to the model's device).
        labels: Class per input ``[B]``, or one class for all (an int).
        target: ``"logprob"`` (log-probability of the label), ``"logit"`` (its logit), or
            a callable ``(activation [B, ...], logits, labels [B]) -> [B]``.
        batch_size: Process the inputs in chunks of this size (default: all at once).

    Returns:
        Gradients ``[B, d]`` (flattened activation shape), float, on the model's device.
    """
    batch = inputs.shape[0]
    label_t = _labels(labels, batch, target)
    params = list(model.parameters())
    device = params[0].device if params else inputs.device
    step = batch_size or max(batch, 1)
    grads: list[Tensor] = []
    with eval_mode(model), torch.enable_grad():
        for start in range(0, batch, step):
            x = inputs[start : start + step].to(device)
            y = label_t[start : start + step].to(device)
            with capture(model, layer, grad_leaf=True) as store:
                logits = model(x)
            act = store[layer]
            values = _target_values(target, act, logits, y)
            (grad,) = torch.autograd.grad(values.sum(), act, allow_unused=True)
            if grad is None:
                raise CdistillError(
                    f"The TCAV target does not depend on layer {layer!r}: is the layer "
                    "on the forward path before the output?"
                )
            grads.append(grad.reshape(grad.shape[0], -1))
    if not grads:
        raise CdistillError("No inputs given for TCAV.")
    return torch.cat(grads)


def directional_derivatives(grads: Tensor, cav: Tensor) -> Tensor:
    """Directional derivatives ``S(x) = ∇_a f(x) · v`` along a CAV (see the module docstring).

    Args:
        grads: Target gradients ``[B, d]`` at a layer, from :func:`target_gradients` (computed
            once, they serve any number of CAVs).
        cav: CAV ``[d]`` (unit normal pointing towards the concept) or CAVs ``[m, d]``, fitted
            at the same layer.

    Returns:
        ``[B]`` for one CAV, ``[B, m]`` for several.
    """
    vecs = cav.to(grads.device, grads.dtype)
    if grads.ndim != 2 or vecs.shape[-1] != grads.shape[1]:
        raise CdistillError(
            f"The CAV has d={vecs.shape[-1]} but the target gradients have shape {tuple(grads.shape)} "
            "([B, d], d the flattened layer size); fit the CAV at the gradients' layer."
        )
    return grads @ vecs.T if vecs.ndim == 2 else grads @ vecs


def tcav_score(derivs: Tensor) -> float:
    """TCAV score: the fraction of directional derivatives ``> 0`` (``[B]`` -> float)."""
    if derivs.numel() == 0:
        raise CdistillError("No directional derivatives to score.")
    return float((derivs > 0).float().mean())


class Significance(NamedTuple):
    """Two-sided t-test of concept vs random TCAV scores; ``effect_size`` is Cohen's d."""

    t: float
    p: float
    effect_size: float


def tcav_significance(
    concept_scores: Sequence[float], random_scores: Sequence[float], *, equal_var: bool = True
) -> Significance:
    """Test whether a concept's TCAV scores differ from random-vs-random scores.

    Args:
        concept_scores: TCAV scores of CAVs fitted against different random sets.
        random_scores: TCAV scores of random-vs-random CAVs.
        equal_var: Student's t-test (the TCAV reference) if True, Welch's if False.

    Returns:
        ``(t, p, effect_size)``: the t statistic, two-sided p-value and Cohen's d with the
        pooled standard deviation (positive when the concept scores are higher).
    """
    a = np.asarray(concept_scores, dtype=np.float64)
    b = np.asarray(random_scores, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise CdistillError(
            f"The t-test needs at least 2 concept and 2 random scores, got {len(a)} and "
            f"{len(b)}; use more random negative sets (n_runs)."
        )
    diff = float(a.mean() - b.mean())
    pooled = math.sqrt(
        ((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2)
    )
    if pooled == 0:
        # Both samples constant: scipy gives nan; the answer is clear-cut.
        if diff == 0:
            return Significance(0.0, 1.0, 0.0)
        return Significance(math.copysign(math.inf, diff), 0.0, math.copysign(math.inf, diff))
    # The t-test written out (same numbers as scipy.stats.ttest_ind) because scipy warns
    # about "catastrophic cancellation" when one group is constant, e.g. all scores 1.0.
    n1, n2, v1, v2 = len(a), len(b), float(a.var(ddof=1)), float(b.var(ddof=1))
    if equal_var:
        se = pooled * math.sqrt(1 / n1 + 1 / n2)
        df = float(n1 + n2 - 2)
    else:
        se = math.sqrt(v1 / n1 + v2 / n2)
        df = se**4 / ((v1 / n1) ** 2 / (n1 - 1) + (v2 / n2) ** 2 / (n2 - 1))
    t = diff / se
    return Significance(t, float(2 * stats.t.sf(abs(t), df)), diff / pooled)


def holm(pvals: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (family-wise error), in the input order.

    ``adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))`` over the ascending p-values;
    reject where ``adj <= alpha``.
    """
    p = np.asarray(pvals, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adjusted = np.empty(m)
    adjusted[order] = np.maximum.accumulate(scaled)
    return adjusted.tolist()


def benjamini_hochberg(pvals: Sequence[float]) -> list[float]:
    """Benjamini–Hochberg adjusted p-values (false discovery rate), in the input order.

    ``adj_(i) = min_{j >= i} min(1, m p_(j) / j)`` over the ascending p-values; reject
    where ``adj <= alpha``.
    """
    p = np.asarray(pvals, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = np.minimum(1.0, m * p[order] / np.arange(1, m + 1))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum.accumulate(scaled[::-1])[::-1]
    return adjusted.tolist()


@dataclass
class TCAVResult:
    """TCAV of one concept at one layer over several random negative sets.

    Attributes:
        mean: Mean TCAV score of the concept. std: Its standard deviation (ddof=1).
        random_mean: Mean random-vs-random score. random_std: Its standard deviation.
        t, p_value, effect_size: Two-sided t-test against the random scores, Cohen's d.
        scores: Per-run concept scores. random_scores: Per-run random scores.
        cav_accuracies: Held-out accuracy of each concept CAV used.
    """

    concept: str
    layer: str
    mean: float
    std: float
    random_mean: float
    random_std: float
    t: float
    p_value: float
    effect_size: float
    scores: list[float] = field(default_factory=list)
    random_scores: list[float] = field(default_factory=list)
    cav_accuracies: list[float] = field(default_factory=list)

    def significant(self, alpha: float = 0.05) -> bool:
        """Whether the uncorrected p-value is at most ``alpha``."""
        return self.p_value <= alpha


def _runs(n_sets: int, n_runs: int | None) -> int:
    """The number of TCAV runs (``n_runs``, default every random set), checked against ``n_sets``."""
    if n_sets < 2:
        raise CdistillError(f"TCAV significance needs at least 2 random negative sets, got {n_sets}.")
    runs = n_sets if n_runs is None else n_runs
    if not 2 <= runs <= n_sets:
        raise CdistillError(f"n_runs must be in [2, {n_sets}] (the number of random sets), got {runs}.")
    return runs


def run_tcav(
    grads: Tensor,
    layer: str,
    concept_acts: Tensor,
    random_sets_acts: Sequence[Tensor],
    solver: str = DEFAULT_SOLVER,
    n_runs: int | None = None,
    *,
    concept: str = "concept",
    min_accuracy: float | None = None,
    test_fraction: float = 0.3,
    seed: int = 0,
) -> TCAVResult:
    """TCAV with a significance test against random directions.

    Run ``i`` fits the concept against random set ``i`` and, as its null counterpart,
    random set ``i + 1`` against random set ``i``. Every CAV is scored on the one set of
    target gradients, which the caller computes with :func:`target_gradients`.

    Caveat: all runs share the one concept set, so its runs are not independent and the
    t-test is optimistic (with a random set as the "concept", p < 0.05 comes up in ~20%
    of seeds rather than 5%). Prefer many random sets, correct across concepts and
    layers (:func:`holm`, :func:`benjamini_hochberg`), and read the effect size too.

    Args:
        grads: Target gradients ``[B, d]`` at ``layer`` of the inputs to score (e.g. images of
            one class), from :func:`target_gradients`.
        layer: Layer spec (CAV metadata and messages).
        concept_acts: Concept activations at ``layer`` ``[n, ...]``.
        random_sets_acts: Activations of at least 2 random sets at ``layer``.
        solver: CAV solver.
        n_runs: Number of runs (default and maximum: the number of random sets).
        concept: Concept name (metadata and warnings).
        min_accuracy: If set, drop concept CAVs below this held-out accuracy (warns).
        test_fraction: Held-out fraction for the CAV fits. seed: Seed of the splits.

    Returns:
        A :class:`TCAVResult`.
    """
    n_sets = len(random_sets_acts)
    runs = _runs(n_sets, n_runs)

    def against_random(i: int, acts: Tensor, name: str) -> CAVResult:
        # Run i's CAVs (the concept's and its null's) share random set i as negatives and one split seed.
        return fit_cav(acts, random_sets_acts[i], solver, test_fraction=test_fraction, seed=seed + i,
                       concept=name, negative=f"random{i}", layer=layer)

    concept_cavs = [against_random(i, concept_acts, concept) for i in range(runs)]
    random_cavs = [against_random(i, random_sets_acts[(i + 1) % n_sets], f"random{(i + 1) % n_sets}")
                   for i in range(runs)]
    if min_accuracy is not None:
        concept_cavs = gate_cavs(concept_cavs, min_accuracy)
        if len(concept_cavs) < 2:
            raise CdistillError(
                f"Only {len(concept_cavs)} CAV(s) of concept {concept!r} at layer {layer!r} "
                f"reach held-out accuracy {min_accuracy}; the concept is not linearly "
                "encoded there (try another layer or more concept images)."
            )

    def score(result: CAVResult) -> float:
        return tcav_score(directional_derivatives(grads, result.vector))

    scores = [score(r) for r in concept_cavs]
    random_scores = [score(r) for r in random_cavs]
    sig = tcav_significance(scores, random_scores)
    return TCAVResult(
        concept=concept,
        layer=layer,
        mean=float(np.mean(scores)),
        std=float(np.std(scores, ddof=1)),
        random_mean=float(np.mean(random_scores)),
        random_std=float(np.std(random_scores, ddof=1)),
        t=sig.t,
        p_value=sig.p,
        effect_size=sig.effect_size,
        scores=scores,
        random_scores=random_scores,
        cav_accuracies=[r.accuracy for r in concept_cavs],
    )
