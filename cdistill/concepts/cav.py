"""Concept activation vectors (CAVs): linear probes between concept and negative activations.

A CAV is the unit normal of a linear decision boundary that separates layer activations
of a concept set C (positive) from a negative set C' (random images or a contrasting
concept), pointing towards C. :func:`fit_cav` fits one on a stratified train split with a
solver of :mod:`cdistill.concepts.solvers` (logistic, svm, ridge, mean_diff; the
preprocessing and the solvers' numerics are described there) and scores it on the held-out
rest; :func:`gate_cavs` keeps the trusted ones; :func:`position_rows` makes the rows of a
position-wise CAV; fitted CAVs are kept in a :class:`~cdistill.concepts.bank.CAVBank`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from cdistill.concepts.bank import CAVBank, CAVResult
from cdistill.concepts.solvers import (
    DEFAULT_SOLVER,
    SCALINGS,
    SOLVER_NAMES,
    SOLVERS,
    _Design,
    _fit_dual,
    _gram_is_cheaper,
    _work_dtype,
    solve_logistic,
    solve_ridge,
    solve_svm,
)
from cdistill.errors import CdistillError, NonFiniteError, unknown_name

MIN_ACCURACY = 0.7  # held-out accuracy gate used in the Concept Distillation paper
__all__ = [
    "DEFAULT_SOLVER", "MIN_ACCURACY", "SCALINGS", "SOLVERS", "SOLVER_NAMES", "CAVBank", "CAVResult", "fit_cav",
    "fit_linear", "gate_cavs", "position_rows", "solve_logistic", "solve_ridge", "solve_svm", "stratified_split",
]


# ----------------------------------------------------------------------------- preprocessing + solver


def fit_linear(
    pos: Tensor, neg: Tensor, solver: str = DEFAULT_SOLVER, *, scaling: str = "global", **solver_kw: Any
) -> tuple[Tensor, Tensor]:
    """Fit one linear separator and return its unit normal and bias in the original space.

    Args:
        pos: Concept activations ``[n1, d]``.
        neg: Negative activations ``[n0, d]``.
        solver: One of :data:`SOLVER_NAMES`.
        scaling: ``"global"``, ``"feature"`` or ``"none"`` (see the module docstring).
        **solver_kw: Passed to the solver (``C``, ``alpha``, ``max_iter``, ``tol``).

    Returns:
        ``(v [d], bias)`` with ``||v|| = 1`` and ``v·x + bias > 0`` predicting the concept;
        ``bias`` is a 0-dim tensor (a signed distance in activation units). Float32 or
        float64, on the inputs' device.
    """
    dtype = _work_dtype(pos)
    x = torch.cat([pos.to(dtype), neg.to(dtype)])
    return _fit_stacked(x, len(pos), solver, scaling, **solver_kw)


def _mean_diff(x: Tensor, n_pos: int, **solver_kw: Any) -> tuple[Tensor, Tensor]:
    """``mean(pos) - mean(neg)`` as a unit vector, boundary through the midpoint."""
    if solver_kw:
        raise TypeError(f"mean_diff takes no solver options, got {sorted(solver_kw)}")
    mean_pos, mean_neg = x[:n_pos].mean(0), x[n_pos:].mean(0)
    w = mean_pos - mean_neg
    norm = torch.linalg.vector_norm(w)
    # Differences at rounding level are no direction at all.
    scale = torch.linalg.vector_norm(mean_pos) + torch.linalg.vector_norm(mean_neg)
    if float(norm) <= 100 * torch.finfo(x.dtype).eps * float(scale):
        raise CdistillError("The concept and negative sets have the same mean: no CAV.")
    v = w / norm
    return v, -(v @ (mean_pos + mean_neg)) / 2


def _fit_stacked(
    x: Tensor, n_pos: int, solver: str, scaling: str, **solver_kw: Any
) -> tuple[Tensor, Tensor]:
    """:func:`fit_linear` on ``x [n, d]`` whose first ``n_pos`` rows are the concept.

    ``x`` is a private copy (float32/64) and is overwritten.
    """
    if solver not in SOLVER_NAMES:
        raise unknown_name("CAV solver", solver, SOLVER_NAMES, "Set the CAV solver to one of these.")
    if scaling not in SCALINGS:
        raise unknown_name("CAV scaling", scaling, SCALINGS, "Set scaling to one of these.")
    dtype = x.dtype
    if solver == "mean_diff":
        return _mean_diff(x, n_pos, **solver_kw)

    n, d = x.shape
    t = -torch.ones(n, dtype=torch.float64, device=x.device)
    t[:n_pos] = 1.0
    mean = x.mean(0, dtype=torch.float64)
    xc = x.sub_(mean.to(dtype))
    feature_scale: Tensor | None = None
    if scaling == "feature":
        # Constant features get scale 1: their centred values are 0 anyway.
        std = torch.linalg.vector_norm(xc, dim=0) / math.sqrt(n)
        feature_scale = torch.where(std > 0, std, torch.ones_like(std))
        xc.div_(feature_scale)
    # The global scale s (s² = mean squared centred entry) is applied inside the
    # products, which saves passes over the [n, d] data.
    s2 = float(torch.linalg.vector_norm(xc)) ** 2 / (n * d) if scaling == "global" else 1.0
    if s2 <= 0:
        raise CdistillError("All activations are identical: no CAV can be fitted.")
    z = _Design(xc, math.sqrt(s2))
    if _gram_is_cheaper(n, d, solver):
        w_s, b = _fit_dual(z, t, solver, **solver_kw)
    else:
        w_s, b = SOLVERS[solver](z, t, **solver_kw)
    # Undo scaling and centring: w_s·(x - mean)/scale + b = w·x + (b - w·mean).
    w = w_s / math.sqrt(s2)
    if feature_scale is not None:
        w = w / feature_scale.double()
    norm = torch.linalg.vector_norm(w)
    if float(norm) == 0 or not math.isfinite(float(norm)):
        raise CdistillError(
            f"The {solver} solver returned a degenerate CAV (|w| = {float(norm)}): the concept "
            "and negative activations are indistinguishable to it."
        )
    bias = (b - w @ mean) / norm
    return (w / norm).to(dtype), bias.to(dtype)


# ----------------------------------------------------------------------------- fit + eval


def _flatten(name: str, acts: Tensor) -> Tensor:
    if acts.ndim < 1 or acts.shape[0] == 0:
        raise CdistillError(
            f"The {name} set has 0 activations: a CAV needs examples of both the concept and "
            "the negative set. Check the concept-set path and that it holds images."
        )
    return acts.reshape(acts.shape[0], -1)


def _split(n: int, test_fraction: float, gen: torch.Generator, name: str) -> tuple[Tensor, Tensor]:
    """Shuffle ``range(n)`` and split it into train and test indices (one class)."""
    perm = torch.randperm(n, generator=gen)
    n_test = round(n * test_fraction)
    if test_fraction > 0:
        if n < 2:
            raise CdistillError(
                f"The {name} set has {n} sample: a held-out split needs at least 2 per "
                "class. Add examples or set test_fraction=0."
            )
        n_test = min(max(n_test, 1), n - 1)
    return perm[n_test:], perm[:n_test]


def stratified_split(
    n_pos: int, n_neg: int, test_fraction: float = 0.3, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The shuffled stratified split :func:`fit_cav` uses (CPU index tensors).

    Each class keeps ``round(n * test_fraction)`` samples for testing (at least 1 and at
    most ``n - 1`` when ``test_fraction > 0``).

    Returns:
        ``(pos_train, pos_test, neg_train, neg_test)`` row indices.
    """
    if not 0 <= test_fraction < 1:
        raise CdistillError(f"test_fraction must be in [0, 1), got {test_fraction}.")
    gen = torch.Generator().manual_seed(seed)
    pos_tr, pos_te = _split(n_pos, test_fraction, gen, "concept")
    neg_tr, neg_te = _split(n_neg, test_fraction, gen, "negative")
    return pos_tr, pos_te, neg_tr, neg_te


def _checked_sets(pos: Tensor, neg: Tensor, concept: str, negative: str, layer: str) -> tuple[Tensor, Tensor]:
    """``pos [n1, d]`` and ``neg [n0, d]`` flattened, after checking they are non-empty, finite
    and of one dimension."""
    pos, neg = _flatten(f"concept {concept!r}", pos), _flatten(f"negative {negative!r}", neg)
    for kind, name, acts in (("concept", concept, pos), ("negative", negative, neg)):
        # A NaN row would give a NaN CAV (mean_diff) or a solver failure, not an error.
        bad = int((~torch.isfinite(acts).all(1)).sum()) if acts.is_floating_point() else 0
        if bad:
            raise NonFiniteError(
                f"The {kind} set {name!r} at layer {layer!r} has {bad} of {len(acts)} activation rows with "
                "NaN/Inf: check its images and the model's weights (a diverged checkpoint?)."
            )
    if pos.shape[1] != neg.shape[1]:
        raise CdistillError(
            f"Concept {concept!r} activations have d={pos.shape[1]} but negative {negative!r} "
            f"activations have d={neg.shape[1]}; collect both at the same layer."
        )
    return pos, neg


def _accuracies(pos_ok: Tensor, neg_ok: Tensor, p_idx: Tensor, n_idx: Tensor) -> tuple[float, float, float]:
    """Accuracy over the rows ``p_idx`` of ``pos_ok [n1]`` and ``n_idx`` of ``neg_ok [n0]``
    (bool: row classified right), and on each set alone (NaN for an empty one)."""
    cp, cn = int(pos_ok[p_idx].sum()), int(neg_ok[n_idx].sum())
    np_, nn_ = len(p_idx), len(n_idx)
    nan = float("nan")
    return (
        (cp + cn) / max(np_ + nn_, 1),
        cp / np_ if np_ else nan,
        cn / nn_ if nn_ else nan,
    )


def fit_cav(
    pos: Tensor,
    neg: Tensor,
    solver: str = DEFAULT_SOLVER,
    *,
    test_fraction: float = 0.3,
    seed: int = 0,
    scaling: str = "global",
    concept: str = "concept",
    negative: str = "random",
    layer: str = "",
    **solver_kw: Any,
) -> CAVResult:
    """Fit a CAV on a shuffled stratified train split and score it on the held-out rest.

    The returned vector is the one fitted on the training split (the one that was
    evaluated), not a refit on all data.

    Args:
        pos: Concept activations ``[n1, ...]`` (flattened to ``[n1, d]``).
        neg: Negative activations ``[n0, ...]`` (flattened to ``[n0, d]``).
        solver: ``"logistic"``, ``"svm"``, ``"ridge"`` or ``"mean_diff"``.
        test_fraction: Fraction of each class held out (stratified); 0 fits on everything
            and reports training accuracy.
        seed: Seed of the split.
        scaling: Feature preprocessing (see the module docstring).
        concept: Concept name (metadata). negative: Negative-set name. layer: Layer name.
        **solver_kw: Solver options, e.g. ``C=1.0`` (logistic, svm) or ``alpha=1.0`` (ridge).

    Returns:
        A :class:`CAVResult` on the inputs' device.

    Raises:
        CdistillError: An empty set, a set too small to split, mismatched dimensions,
            NaN/Inf activations (:class:`~cdistill.errors.NonFiniteError`).
    """
    pos, neg = _checked_sets(pos, neg, concept, negative, layer)
    neg = neg.to(pos.device)
    try:
        pos_tr, pos_te, neg_tr, neg_te = stratified_split(len(pos), len(neg), test_fraction, seed)
    except CdistillError as err:
        raise CdistillError(f"Concept {concept!r} vs {negative!r} at layer {layer!r}: {err}") from None
    dev, dtype = pos.device, _work_dtype(pos)
    pos_tr, pos_te, neg_tr, neg_te = (i.to(dev) for i in (pos_tr, pos_te, neg_tr, neg_te))
    n_pos = len(pos_tr)
    if pos.dtype == neg.dtype == dtype:
        # One copy of the training rows (the solver centres it in place).
        x = torch.empty(n_pos + len(neg_tr), pos.shape[1], dtype=dtype, device=dev)
        torch.index_select(pos, 0, pos_tr, out=x[:n_pos])
        torch.index_select(neg, 0, neg_tr, out=x[n_pos:])
    else:
        x = torch.cat([pos[pos_tr].to(dtype), neg[neg_tr].to(dtype)])
    v, bias = _fit_stacked(x, n_pos, solver, scaling, **solver_kw)
    del x
    # Scores of every row in one pass, then split; no copies of the test rows.
    pos_ok = (pos.to(dtype) @ v + bias) > 0
    neg_ok = (neg.to(dtype) @ v + bias) <= 0

    train_acc = _accuracies(pos_ok, neg_ok, pos_tr, neg_tr)
    test = _accuracies(pos_ok, neg_ok, pos_te, neg_te) if len(pos_te) + len(neg_te) else train_acc
    return CAVResult(
        vector=v,
        bias=float(bias),
        accuracy=test[0],
        accuracy_pos=test[1],
        accuracy_neg=test[2],
        train_accuracy=train_acc[0],
        n_train=n_pos + len(neg_tr),
        n_test=len(pos_te) + len(neg_te),
        solver=solver,
        concept=concept,
        negative=negative,
        layer=layer,
    )


def position_rows(
    acts: Tensor,
    blank: Tensor | None = None,
    *,
    threshold: float = 0.1,
    max_rows: int | None = 20000,
    seed: int = 0,
) -> Tensor:
    """Per-position channel vectors of conv maps, as rows for a position-wise CAV.

    A conv map encodes a local concept (a colour, a texture) in its ``C`` channels at each
    position; a CAV in that ``C``-dim space is one direction shared by every position, where a
    CAV on the flattened map is one direction per (channel, position) pair. The rows are the
    positions where the image has content: where the activation differs from that of a blank
    (background-only) image by more than ``threshold`` times the image's largest difference.
    Without ``blank`` every position is kept.

    Args:
        acts: ``[N, C, H, W]`` activations (any number of trailing position dimensions).
        blank: ``[C, H, W]`` activation of a blank image, or ``None``.
        threshold: Relative difference (in ``[0, 1)``) above which a position is kept.
        max_rows: Keep at most this many rows (a seeded random subset); ``None``: all.
        seed: Seed of the subset.

    Returns:
        ``[M, C]`` rows (``M <= N * H * W``), on the input's device.
    """
    if acts.ndim < 3:
        raise CdistillError(
            f"Position-wise CAVs need conv maps [N, C, H, W]; got activations of shape {tuple(acts.shape)}."
        )
    n, c = acts.shape[:2]
    rows = acts.reshape(n, c, -1).transpose(1, 2)  # [N, P, C]
    if blank is None:
        keep = torch.ones(rows.shape[:2], dtype=torch.bool, device=acts.device)
    else:
        diff = (rows - blank.reshape(c, -1).T.to(rows)).norm(dim=-1)  # [N, P]
        keep = diff > threshold * diff.amax(dim=1, keepdim=True).clamp_min(1e-12)
    out = rows[keep]
    if len(out) == 0:
        raise CdistillError("No position of the concept images differs from a blank image: no position-wise rows.")
    if max_rows is not None and len(out) > max_rows:
        gen = torch.Generator().manual_seed(seed)
        out = out[torch.randperm(len(out), generator=gen)[:max_rows].to(out.device)]
    return out


def gate_cavs(results: Iterable[CAVResult], min_accuracy: float = MIN_ACCURACY) -> list[CAVResult]:
    """Keep the CAVs whose held-out accuracy reaches ``min_accuracy``; warn about the rest.

    A CAV that barely beats chance is not a concept direction (Concept Distillation uses
    0.7). NaN accuracy counts as failing.
    """
    kept = []
    for result in results:
        if result.accuracy >= min_accuracy:
            kept.append(result)
            continue
        warnings.warn(
            f"Dropping the CAV of concept {result.concept!r} (vs {result.negative!r}) at "
            f"layer {result.layer!r}: held-out accuracy {result.accuracy:.3f} < "
            f"{min_accuracy}. The layer may not encode the concept linearly; try another "
            "layer or more concept images.",
            stacklevel=2,
        )
    return kept
