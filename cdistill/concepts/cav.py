"""Concept activation vectors (CAVs): linear probes between concept and negative activations.

A CAV is the unit normal of a linear decision boundary that separates layer activations
of a concept set C (positive) from a negative set C' (random images or a contrasting
concept), pointing towards C.

Solvers run in torch on whatever device the activations are on:

- ``"logistic"``: L2-regularised logistic regression, ``0.5||w||² + C Σ log(1 + e^{-t m})``
  (the objective of scikit-learn's ``LogisticRegression``; unpenalised bias).
- ``"svm"``: linear SVM with the squared hinge, ``0.5||w||² + C Σ max(0, 1 - t m)²``.
- ``"ridge"``: least squares on ±1 targets, ``||Xw + b - t||² + alpha ||w||²``.
- ``"mean_diff"``: ``mean(pos) - mean(neg)``, boundary through the midpoint.

Preprocessing: features are centred on the training mean and, by default (``scaling=
"global"``), divided by one scalar (the RMS of the centred entries). One scalar keeps the
geometry (and so the direction of the L2-regularised solution) of the original space, and
makes ``C``/``alpha`` mean the same thing at layers with different activation scales.
``scaling="feature"`` standardises every feature instead; ``"none"`` only centres. The
returned ``vector`` is always the unit normal in the ORIGINAL activation space.

Logistic and SVM run truncated Newton (conjugate-gradient steps preconditioned by the
Hessian diagonal); ridge runs the same machinery on its quadratic. Two ways to apply it:

- Iterating on the ``[n, d]`` rows: ``O(n d)`` per CG step, no ``n x n`` or ``d x d``
  matrix. Used when ``n >= d`` and when ``n`` approaches ``d``.
- For few rows of many features, an exact ``r``-dimensional reduction (``r <= n``): from
  the ``n x n`` Gram matrix ``Xc Xcᵀ = U S Uᵀ`` the features become ``Z = U S^½``, which
  has the same inner products (so the same losses and the same L2 norm of the weights),
  and the weights map back as ``w = Xcᵀ U S^-½ β``. ``Zᵀ Z = S`` is diagonal, so the
  diagonal preconditioner is nearly exact there. Cost ``O(n² d + n³)`` in dense BLAS.

A cost model (``_gram_is_cheaper``) picks the cheaper one. Float32 activations (what
``collect_activations`` returns) give the float64 optimum: the products that decide the
optimum (margins, gradients, the Gram matrix, the map back) accumulate in float64 from
blocks of the float32 rows, and only directions at float64 rounding level leave the Gram
reduction; Hessian-vector products stay in float32 (they only steer the search). The
results match scikit-learn's ``LogisticRegression``/``LinearSVC`` optima (tested).

Under heavy CPU oversubscription (more busy threads than cores) the small LAPACK calls
slow down a lot; ``torch.set_num_threads`` to the free cores helps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdistill.errors import CdistillError, NonFiniteError, unknown_name
from cdistill.utils.buffers import FittedBuffers

MIN_ACCURACY = 0.7  # held-out accuracy gate used in the Concept Distillation paper
SCALINGS = ("global", "feature", "none")


# ----------------------------------------------------------------------------- solvers
# Each solver takes preprocessed features z [n, r] (centred; a tensor or a _Design) and
# targets t [n] in {-1, +1} (float64) and returns weights beta [r] and bias b (a 0-dim
# tensor), both float64.

_BLOCK_ENTRIES = 1 << 22  # entries converted to float64 at a time (32 MB)


class _Design:
    """The features ``z = x / scale`` ``[n, d]`` as matrix products, without copying ``x``.

    ``x`` may be float32 (what ``collect_activations`` returns). The products that decide
    where the optimum is (margins, gradients, the Gram matrix, the map back to weights)
    convert blocks of ``x`` to float64 and accumulate there, so the optimum is that of
    the float64 problem on the same data. Products that only steer the search
    (Hessian-vector products, the preconditioner) run in ``x``'s dtype: their rounding
    slows the Newton iteration slightly but does not move its fixed point.
    """

    def __init__(self, x: Tensor, scale: float = 1.0) -> None:
        self.x, self.scale = x, scale
        self.n, self.d = x.shape
        self.exact = x.dtype == torch.float64
        self._rows = max(1, _BLOCK_ENTRIES // max(self.d, 1))

    def mv(self, w: Tensor) -> Tensor:
        """``z @ w`` ``[n]`` (float64 accumulation)."""
        if self.exact:
            return self.x @ w / self.scale
        out = torch.empty(self.n, dtype=torch.float64, device=self.x.device)
        for i in range(0, self.n, self._rows):
            out[i : i + self._rows] = self.x[i : i + self._rows].double() @ w
        return out / self.scale

    def rmv(self, r: Tensor) -> Tensor:
        """``zᵀ r`` ``[d]`` (float64 accumulation)."""
        if self.exact:
            return self.x.T @ r / self.scale
        out = torch.zeros(self.d, dtype=torch.float64, device=self.x.device)
        for i in range(0, self.n, self._rows):
            out += self.x[i : i + self._rows].double().T @ r[i : i + self._rows]
        return out / self.scale

    def fast_mv(self, w: Tensor) -> Tensor:
        """``z @ w`` ``[n]`` in the storage dtype (returned as float64)."""
        return (self.x @ w.to(self.x.dtype)).double() / self.scale

    def fast_rmv(self, r: Tensor) -> Tensor:
        """``zᵀ r`` ``[d]`` in the storage dtype (returned as float64)."""
        return (self.x.T @ r.to(self.x.dtype)).double() / self.scale

    def sq_rmv(self, c: Tensor) -> Tensor:
        """``(z ⊙ z)ᵀ c`` ``[d]``: the diagonal of ``zᵀ diag(c) z`` (storage dtype)."""
        out = torch.zeros(self.d, dtype=self.x.dtype, device=self.x.device)
        c = c.to(self.x.dtype)
        for i in range(0, self.n, self._rows):
            out += self.x[i : i + self._rows].pow(2).T @ c[i : i + self._rows]
        return out.double() / self.scale**2

    def gram(self) -> Tensor:
        """``z zᵀ`` ``[n, n]`` in float64 (blocks of columns are converted)."""
        if self.exact:
            return self.x @ self.x.T / self.scale**2
        out = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.x.device)
        cols = max(1, _BLOCK_ENTRIES // max(self.n, 1))
        for j in range(0, self.d, cols):
            block = self.x[:, j : j + cols].double()
            out.addmm_(block, block.T)
        return out / self.scale**2


def _as_design(z: Tensor | _Design) -> _Design:
    return z if isinstance(z, _Design) else _Design(z.double())


@dataclass(frozen=True)
class _MarginLoss:
    """A per-sample loss of the margin ``m = t (z·w + b)`` with its first and
    (generalised) second derivative."""

    value: Callable[[Tensor], Tensor]
    grad: Callable[[Tensor], Tensor]
    curv: Callable[[Tensor], Tensor]


LOGISTIC = _MarginLoss(
    value=lambda m: torch.nn.functional.softplus(-m),
    grad=lambda m: -torch.sigmoid(-m),
    curv=lambda m: torch.sigmoid(m) * torch.sigmoid(-m),
)
SQUARED_HINGE = _MarginLoss(
    value=lambda m: torch.clamp(1 - m, min=0).pow(2),
    grad=lambda m: -2 * torch.clamp(1 - m, min=0),
    curv=lambda m: 2 * (m < 1).to(m.dtype),
)
# (z·w + b - t)² = (m - 1)² because t² = 1: least squares on ±1 targets as a margin loss.
SQUARED = _MarginLoss(
    value=lambda m: (1 - m).pow(2),
    grad=lambda m: -2 * (1 - m),
    curv=lambda m: torch.full_like(m, 2.0),
)


def _pcg(hvp: Callable[[Tensor], Tensor], b: Tensor, inv_diag: Tensor, rtol: float, max_iter: int) -> Tensor:
    """Solve ``H x = b`` (H symmetric positive definite, given as ``hvp``) by Jacobi-
    preconditioned conjugate gradients to relative residual ``rtol``."""
    x = torch.zeros_like(b)
    if float(torch.linalg.vector_norm(b)) == 0:
        return x  # already at the optimum
    r = b.clone()
    z = inv_diag * r
    p = z.clone()
    rz = r @ z
    stop = rtol * float(torch.linalg.vector_norm(b))
    for _ in range(max_iter):
        hp = hvp(p)
        alpha = rz / (p @ hp)
        x += alpha * p
        r -= alpha * hp
        if float(torch.linalg.vector_norm(r)) <= stop:
            break
        z = inv_diag * r
        rz_new = r @ z
        p = z + (rz_new / rz) * p
        rz = rz_new
    return x


def _margin_newton(
    z: _Design, t: Tensor, C: float, lam: float, loss: _MarginLoss, max_iter: int, tol: float
) -> tuple[Tensor, Tensor]:
    """Minimise ``0.5 lam ||w||² + C Σ_i loss(t_i (z_i·w + b))`` by truncated Newton.

    Newton steps are solved by conjugate gradients with the Hessian diagonal as
    preconditioner: ``O(n d)`` per CG step, no ``d x d`` or ``n x n`` matrix. In the
    Gram-reduced coordinates ``zᵀz`` is diagonal, so the preconditioner is very good
    there. The forcing term ``min(0.5, sqrt(|g| / |g0|))`` makes convergence superlinear;
    an Armijo backtracking line search keeps every step a descent step. Gradients and
    margins accumulate in float64 (see :class:`_Design`), so the result is the float64
    optimum even for float32 ``z``.

    Args:
        z: Centred features ``[n, d]``. t: Targets ``[n]`` in {-1, +1} (float64).
        C: Weight of the loss. lam: Weight of the L2 penalty (the bias is unpenalised).
        loss: The per-sample margin loss.
        max_iter: Maximum Newton steps. tol: Stop when the predicted decrease (half the
            Newton decrement²) is below ``tol * max(1, objective)``.

    Returns:
        ``(w [d], b)``, float64.
    """
    dev = z.x.device
    w = torch.zeros(z.d, dtype=torch.float64, device=dev)
    b = torch.zeros((), dtype=torch.float64, device=dev)
    margins = torch.zeros(z.n, dtype=torch.float64, device=dev)  # t (z w + b)
    damping = 1e-10 * z.n * max(C, 1.0)  # keeps H invertible when all margins saturate
    g0 = None
    for _ in range(max_iter):
        value = 0.5 * lam * float(w @ w) + C * float(loss.value(margins).sum())
        coef = C * t * loss.grad(margins)  # d objective / d (z_i·w + b)
        grad = torch.cat([lam * w + z.rmv(coef), coef.sum()[None]])
        curv = C * loss.curv(margins)
        gnorm = float(torch.linalg.vector_norm(grad))
        g0 = g0 or max(gnorm, 1e-300)
        diag = torch.cat([lam + damping * (lam == 0) + z.sq_rmv(curv), (curv.sum() + damping)[None]])

        def hvp(v: Tensor, curv: Tensor = curv) -> Tensor:
            q = curv * (z.fast_mv(v[:-1]) + v[-1])
            return torch.cat([lam * v[:-1] + z.fast_rmv(q), (q.sum() + damping * v[-1])[None]])

        inv_diag = torch.where(diag > 0, 1 / diag, torch.ones_like(diag))
        step = _pcg(hvp, grad, inv_diag, min(0.5, (gnorm / g0) ** 0.5), max_iter=10 * (z.d + 1))
        decrement = float(grad @ step)
        if decrement / 2 <= tol * max(1.0, abs(value)):
            break
        d_margins = t * (z.mv(step[:-1]) + step[-1])
        lr = 1.0
        for _ in range(40):
            cand_w, cand_margins = w - lr * step[:-1], margins - lr * d_margins
            cand = 0.5 * lam * float(cand_w @ cand_w) + C * float(loss.value(cand_margins).sum())
            if cand <= value - 1e-4 * lr * decrement:
                break
            lr *= 0.5
        w, b, margins = cand_w, b - lr * step[-1], cand_margins
    return w, b


def solve_logistic(
    z: Tensor | _Design, t: Tensor, *, C: float = 1.0, max_iter: int = 100, tol: float = 1e-10
) -> tuple[Tensor, Tensor]:
    """L2-regularised logistic regression, ``0.5||w||² + C Σ log(1 + exp(-t (z·w + b)))``.

    Args:
        z: Centred features ``[n, r]``. t: Targets ``[n]`` in {-1, +1}.
        C: Inverse regularisation strength (as in scikit-learn).
        max_iter: Maximum Newton steps. tol: Relative stopping tolerance.
    """
    return _margin_newton(_as_design(z), t, C, 1.0, LOGISTIC, max_iter, tol)


def solve_svm(
    z: Tensor | _Design, t: Tensor, *, C: float = 1.0, max_iter: int = 100, tol: float = 1e-10
) -> tuple[Tensor, Tensor]:
    """Linear SVM with the squared hinge, ``0.5||w||² + C Σ max(0, 1 - t (z·w + b))²``.

    Generalised Newton steps (the loss is piecewise quadratic: few steps suffice).

    Args:
        z: Centred features ``[n, r]``. t: Targets ``[n]`` in {-1, +1}.
        C: Inverse regularisation strength (as in scikit-learn's ``LinearSVC``).
        max_iter: Maximum Newton steps. tol: Relative stopping tolerance.
    """
    return _margin_newton(_as_design(z), t, C, 1.0, SQUARED_HINGE, max_iter, tol)


def solve_ridge(
    z: Tensor | _Design, t: Tensor, *, alpha: float = 1.0, max_iter: int = 100, tol: float = 1e-10
) -> tuple[Tensor, Tensor]:
    """Ridge regression on ±1 targets, ``||z·w + b - t||² + alpha ||w||²``.

    A quadratic, so Newton converges in one step up to the accuracy of its CG solve; a
    few refinement steps make it exact without a ``d x d`` or ``n x n`` factorisation.

    Args:
        z: Centred features ``[n, r]``. t: Targets ``[n]`` in {-1, +1}.
        alpha: L2 regularisation strength.
        max_iter: Maximum Newton steps. tol: Relative stopping tolerance.
    """
    return _margin_newton(_as_design(z), t, 1.0, 2.0 * alpha, SQUARED, max_iter, tol)


SOLVERS: dict[str, Callable[..., tuple[Tensor, Tensor]]] = {
    "logistic": solve_logistic,
    "svm": solve_svm,
    "ridge": solve_ridge,
}
SOLVER_NAMES = (*SOLVERS, "mean_diff")


def fit_linear(
    pos: Tensor, neg: Tensor, solver: str = "logistic", *, scaling: str = "global", **solver_kw: Any
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


def _work_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


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


# Cost of the iterative path in units of n·d, as multiples of the Gram path's dense-BLAS
# flops: about 2 products per CG step, memory-bound (~8x slower per flop than a GEMM),
# times the CG steps measured on activation-like data (benchmarks/bench_cav.py): a few
# hundred for logistic, thousands for the squared losses, whose curvature does not fade
# at large margins.
_ITERATIVE_WORK = {"logistic": 4_000, "svm": 40_000, "ridge": 40_000}


def _gram_is_cheaper(n: int, d: int, solver: str) -> bool:
    """Whether the ``n x n`` Gram reduction (``n² d / 2`` flops for the matrix, about
    ``10 n³`` for its eigendecomposition) beats iterating on the ``[n, d]`` rows
    (``O(n d)`` per CG step). Few rows of many features: the Gram path; as ``n``
    approaches ``d`` (``n ≳ 1000`` at ``d = 3200`` for logistic): the iterative one."""
    return d > n and n / 2 + 10 * n * n / d <= _ITERATIVE_WORK[solver]


def _fit_dual(z: _Design, t: Tensor, solver: str, **solver_kw: Any) -> tuple[Tensor, Tensor]:
    """Fit in the exact low-dimensional reduction through the Gram matrix.

    From ``z zᵀ = U S Uᵀ`` (float64) the features become ``U S^½`` (same inner products,
    so the same losses and the same L2 norm of the weights), and the weights map back as
    ``w = zᵀ U S^-½ β``. Only directions at float64 rounding level are dropped.

    Returns:
        ``(w [d], b)`` in ``z``'s space, float64.
    """
    evals, evecs = torch.linalg.eigh(z.gram())
    keep = evals > evals.max().clamp_min(0) * z.n * torch.finfo(torch.float64).eps
    if not bool(keep.any()):
        raise CdistillError("All activations are identical: no CAV can be fitted.")
    evals, evecs = evals[keep], evecs[:, keep]
    root = evals.sqrt()
    beta, b = SOLVERS[solver](_Design(evecs * root), t, **solver_kw)
    return z.rmv(evecs @ (beta / root)), b


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


@dataclass
class CAVResult:
    """A fitted CAV and how well its linear probe separates held-out activations.

    Attributes:
        vector: Unit normal ``[d]`` in activation space, pointing towards the concept.
        bias: Offset so that ``vector·a + bias > 0`` predicts the concept.
        accuracy: Held-out accuracy (mean over samples), or the training accuracy when
            ``n_test == 0``.
        accuracy_pos: Held-out accuracy on concept samples.
        accuracy_neg: Held-out accuracy on negative samples.
        train_accuracy: Accuracy on the training split.
        n_train: Training samples. n_test: Held-out samples.
    """

    vector: Tensor
    bias: float
    accuracy: float
    accuracy_pos: float
    accuracy_neg: float
    train_accuracy: float
    n_train: int
    n_test: int
    solver: str
    concept: str = "concept"
    negative: str = "random"
    layer: str = ""


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


def fit_cav(
    pos: Tensor,
    neg: Tensor,
    solver: str = "logistic",
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

    def acc(p_idx: Tensor, n_idx: Tensor) -> tuple[float, float, float]:
        cp, cn = int(pos_ok[p_idx].sum()), int(neg_ok[n_idx].sum())
        np_, nn_ = len(p_idx), len(n_idx)
        nan = float("nan")
        return (
            (cp + cn) / max(np_ + nn_, 1),
            cp / np_ if np_ else nan,
            cn / nn_ if nn_ else nan,
        )

    train_acc = acc(pos_tr, neg_tr)
    test = acc(pos_te, neg_te) if len(pos_te) + len(neg_te) else train_acc
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


# ----------------------------------------------------------------------------- bank

_META_KEYS = ("concepts", "negatives", "layers", "solvers")


class CAVBank(FittedBuffers):
    """Fitted CAVs as module buffers, so checkpoints carry them and ``.to()`` moves them.

    Buffers: ``vectors [m, d]`` (unit rows), ``biases [m]``, ``accuracies [m]``
    (held-out). Metadata (concept, negative set, layer, solver per row) are python lists
    stored through ``get_extra_state``, which keeps the state dict loadable with
    ``torch.load(..., weights_only=True)``. All rows share one dimension ``d``; use one
    bank per layer when layers differ in size.
    """

    vectors: Tensor
    biases: Tensor
    accuracies: Tensor
    resizable = ("vectors", "biases", "accuracies")

    def __init__(self, results: Sequence[CAVResult] = ()) -> None:
        super().__init__()
        self.register_buffer("vectors", torch.zeros(0, 0))
        self.register_buffer("biases", torch.zeros(0))
        self.register_buffer("accuracies", torch.zeros(0))
        self.concepts: list[str] = []
        self.negatives: list[str] = []
        self.layers: list[str] = []
        self.solvers: list[str] = []
        for result in results:
            self.add(result)

    def __len__(self) -> int:
        return len(self.concepts)

    @property
    def dim(self) -> int:
        """Activation dimension ``d`` (0 for an empty bank)."""
        return int(self.vectors.shape[1])

    def add(self, result: CAVResult) -> int:
        """Append a fitted CAV; returns its row index."""
        vec = result.vector.detach().reshape(-1)
        if len(self) and vec.numel() != self.dim:
            raise CdistillError(
                f"CAV of concept {result.concept!r} at layer {result.layer!r} has d="
                f"{vec.numel()}, but this bank holds d={self.dim} (layers "
                f"{sorted(set(self.layers))}); use one CAVBank per layer size."
            )
        # An empty bank adopts the first vector's device; rows are float32 by default.
        device = self.vectors.device if len(self) else vec.device
        dtype = self.vectors.dtype if len(self) else torch.float32
        old = self.vectors if len(self) else self.vectors.new_zeros(0, vec.numel())
        scalars = torch.tensor([[result.bias, result.accuracy]], dtype=dtype, device=device)
        self.vectors = torch.cat([old.to(device, dtype), vec.to(device, dtype)[None]])
        self.biases = torch.cat([self.biases.to(device, dtype), scalars[:, 0]])
        self.accuracies = torch.cat([self.accuracies.to(device, dtype), scalars[:, 1]])
        self.concepts.append(result.concept)
        self.negatives.append(result.negative)
        self.layers.append(result.layer)
        self.solvers.append(result.solver)
        return len(self) - 1

    def indices(
        self, concept: str, layer: str | None = None, negative: str | None = None
    ) -> list[int]:
        """Rows of ``concept`` (optionally only at ``layer`` / against ``negative``).

        Raises:
            CdistillError: No such concept (close names listed) or no row matches.
        """
        if concept not in self.concepts:
            raise unknown_name("concept", concept, self.concepts, "Use a concept of this CAV bank.")
        entries = list(zip(self.concepts, self.layers, self.negatives, strict=True))
        rows = [
            i
            for i, (c, ly, ng) in enumerate(entries)
            if c == concept and (layer is None or ly == layer) and (negative is None or ng == negative)
        ]
        if not rows:
            have = sorted({(ly, ng) for c, ly, ng in entries if c == concept})
            raise CdistillError(
                f"No CAV of concept {concept!r} at layer {layer!r} against {negative!r}; "
                f"it has (layer, negative) = {have}."
            )
        return rows

    def vector(self, concept: str, layer: str | None = None, negative: str | None = None) -> Tensor:
        """The unit CAV ``[d]`` of one concept; the arguments must pick exactly one row."""
        rows = self.indices(concept, layer, negative)
        if len(rows) > 1:
            choices = [(self.layers[i], self.negatives[i]) for i in rows]
            raise CdistillError(
                f"Concept {concept!r} has {len(rows)} CAVs (layer, negative) = {choices}; "
                "pass layer= and/or negative= to pick one."
            )
        return self.vectors[rows[0]]

    def at_layer(self, layer: str) -> tuple[list[str], Tensor]:
        """Concept names and CAVs ``[k, d]`` of every row at ``layer``."""
        if layer not in self.layers:
            raise unknown_name("CAV layer", layer, self.layers, "Use a layer of this CAV bank.")
        rows = [i for i, ly in enumerate(self.layers) if ly == layer]
        return [self.concepts[i] for i in rows], self.vectors[rows]

    def get_extra_state(self) -> dict[str, list[str]]:
        return {key: list(getattr(self, key)) for key in _META_KEYS}

    def set_extra_state(self, state: Any) -> None:
        for key in _META_KEYS:
            setattr(self, key, [str(s) for s in state[key]])

    def save(self, path: str | Path) -> None:
        """Write the bank to ``path`` (loadable with ``torch.load(weights_only=True)``)."""
        payload = {
            "format": "cdistill.CAVBank",
            "version": 1,
            "vectors": self.vectors.detach().cpu(),
            "biases": self.biases.detach().cpu(),
            "accuracies": self.accuracies.detach().cpu(),
            **self.get_extra_state(),
        }
        torch.save(payload, Path(path))

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> CAVBank:
        """Read a bank written by :meth:`save` (safe: ``weights_only=True``)."""
        payload = torch.load(Path(path), map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != "cdistill.CAVBank":
            raise CdistillError(f"{path} is not a CAV bank written by CAVBank.save().")
        bank = cls()
        bank.vectors = payload["vectors"]
        bank.biases = payload["biases"]
        bank.accuracies = payload["accuracies"]
        bank.set_extra_state(payload)
        return bank

    def extra_repr(self) -> str:
        return f"m={len(self)}, d={self.dim}, concepts={sorted(set(self.concepts))}"
