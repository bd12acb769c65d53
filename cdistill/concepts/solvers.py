"""The linear solvers behind CAVs (:func:`cdistill.concepts.cav.fit_cav`).

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cdistill.errors import CdistillError

#: The default CAV solver (the Concept Distillation paper's logistic regression).
DEFAULT_SOLVER = "logistic"
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


def _work_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


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
