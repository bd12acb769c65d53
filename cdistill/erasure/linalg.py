"""Linear algebra behind the closed-form erasers: whitening, shrinkage, concept-space bases.

Whitening. LEACE needs ``W`` with ``W^T W = Sigma_xx^{-1}`` and ``W^+``. Its projection
``P = W^+ Proj(W Sigma_xz) W`` does not depend on *which* such W is used: for ``W = O
Sigma^{-1/2}`` with O orthogonal, ``Proj(W B) = O Proj(Sigma^{-1/2} B) O^T`` and the O's cancel.
So when Sigma_xx is numerically positive definite we use its Cholesky factor (``W = L^{-1}``,
``W^+ = L``: d^3/3 flops, about 20x cheaper than an eigendecomposition at d = 4096) and
otherwise one eigendecomposition with a pseudo-inverse that ignores null directions.
Neither path ever forms a d x d whitening matrix: W is only applied to d x k blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from cdistill.errors import CdistillError

WhiteningMethod = Literal["auto", "cholesky", "eigh"]


def oas_shrinkage(cov: Tensor, n: int) -> float:
    """Oracle Approximating Shrinkage intensity (Chen et al. 2010, scikit-learn's form).

    The shrunk estimate is ``(1 - rho) cov + rho * tr(cov)/d * I`` with

        rho = min(1, (tr(S^2) + tr(S)^2) / ((n + 1) (tr(S^2) - tr(S)^2 / d)))

    which is invariant to the scale of ``cov`` (so the n vs n - 1 divisor does not matter)
    and needs only the covariance and n, hence works on streamed statistics.

    Args:
        cov: ``[d, d]`` sample covariance.
        n: Number of samples it was estimated from.

    Returns:
        rho in [0, 1].
    """
    d = cov.shape[0]
    tr = float(torch.diagonal(cov).sum())
    tr2 = float((cov * cov).sum())
    den = (n + 1) * (tr2 - tr * tr / d)
    if den <= 0:
        return 1.0
    return min(1.0, (tr2 + tr * tr) / den)


def shrink(cov: Tensor, n: int, shrinkage: bool | float) -> tuple[Tensor, float]:
    """Shrink ``cov`` towards a scaled identity.

    Args:
        cov: ``[d, d]`` covariance.
        n: Sample count (for the OAS intensity).
        shrinkage: ``False`` (none), ``True`` (OAS intensity) or a fixed intensity in [0, 1].

    Returns:
        The shrunk ``[d, d]`` matrix and the intensity used.
    """
    if shrinkage is False:
        return cov, 0.0
    rho = oas_shrinkage(cov, n) if shrinkage is True else float(shrinkage)
    if not 0.0 <= rho <= 1.0:
        raise CdistillError(f"shrinkage must be a bool or a float in [0, 1]; got {shrinkage}.")
    target = torch.diagonal(cov).mean()
    out = (1 - rho) * cov
    out.diagonal().add_(rho * target)
    return out, rho


def _inverse_iteration_lambda_min(chol: Tensor, iters: int = 4, block: int = 4) -> float:
    """Upper estimate of the smallest eigenvalue of ``L L^T`` by block inverse iteration.

    Each step is two triangular solves on a ``[d, block]`` block (O(d^2) and memory bound),
    free next to the factorisation. We only need the order of magnitude: an eigenvalue far
    below the rest (a near-null direction) dominates after one or two steps.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(chol.shape[0], block, generator=gen, dtype=chol.dtype).to(chol.device)
    top = 0.0
    for _ in range(iters):
        v = v / v.norm(dim=0, keepdim=True)
        w = torch.linalg.solve_triangular(chol, v, upper=False)
        # ||L^{-1} v||^2 = v^T Sigma^{-1} v: a lower bound on 1 / lambda_min.
        top = max(top, float(w.pow(2).sum(0).max()))
        v = torch.linalg.solve_triangular(chol.T, w, upper=True)
        if not bool(torch.isfinite(v).all()):
            return 0.0
    return 1.0 / top if top > 0 else 0.0


def _power_iteration_lambda_max(cov: Tensor, iters: int = 4, block: int = 4) -> float:
    """Lower estimate of the largest eigenvalue of ``cov`` (within a small factor)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    v = torch.randn(cov.shape[0], block, generator=gen, dtype=cov.dtype).to(cov.device)
    lam = float(torch.diagonal(cov).max())  # e_i^T cov e_i is a valid lower bound too
    for _ in range(iters):
        v = v / v.norm(dim=0, keepdim=True).clamp_min(torch.finfo(cov.dtype).tiny)
        w = cov @ v
        lam = max(lam, float((v * w).sum(0).max()))
        v = w
    return lam


@dataclass
class Whitener:
    """Applies ``W``, ``W^T`` and ``W^+`` for a PSD matrix without forming any of them.

    Build with :meth:`from_cov`. Exactly one of ``chol`` (``W = L^{-1}``) or the eigen pair
    ``evecs``/``evals`` (``W = V diag(evals^{-1/2}) V^T`` over the kept eigenvalues) is set.

    Attributes:
        method: ``"cholesky"`` or ``"eigh"``.
        rank: Number of directions whitened (d for Cholesky; kept eigenvalues for eigh).
        chol: ``[d, d]`` lower Cholesky factor, or None.
        evecs: ``[d, q]`` kept eigenvectors, or None.
        evals: ``[q]`` kept eigenvalues, or None.
    """

    method: str
    rank: int
    chol: Tensor | None = None
    evecs: Tensor | None = None
    evals: Tensor | None = None

    @classmethod
    def from_cov(
        cls, cov: Tensor, rtol: float | None = None, method: WhiteningMethod = "auto"
    ) -> Whitener:
        """Factor a ``[d, d]`` PSD matrix for whitening.

        Args:
            cov: ``[d, d]`` symmetric PSD matrix (float64 recommended).
            rtol: Eigenvalues at or below ``rtol * lambda_max`` count as null directions
                (pseudo-inverse). Default ``d * eps`` of the dtype, like ``numpy.linalg.pinv``.
                ``"auto"`` only takes the Cholesky path when the estimated condition number
                is below ``1 / rtol``, so both paths agree on what "singular" means.
            method: ``"auto"`` (Cholesky when well posed, else eigh), ``"cholesky"`` (error if
                not positive definite) or ``"eigh"``.
        """
        d = cov.shape[0]
        if rtol is None:
            rtol = d * torch.finfo(cov.dtype).eps
        if method in ("auto", "cholesky"):
            chol, info = torch.linalg.cholesky_ex(cov)
            ok = int(info) == 0
            if ok and method == "auto":
                lam_min = _inverse_iteration_lambda_min(chol)
                lam_max = _power_iteration_lambda_max(cov)
                ok = lam_min > rtol * lam_max
            if ok:
                return cls(method="cholesky", rank=d, chol=chol)
            if method == "cholesky":
                raise CdistillError(
                    "whitening='cholesky' needs a positive definite covariance, but it is "
                    "singular or nearly so; use whitening='auto' or 'eigh', or shrinkage=True."
                )
        evals, evecs = torch.linalg.eigh(cov)
        top = float(evals[-1]) if d else 0.0
        keep = evals > rtol * top if top > 0 else torch.zeros_like(evals, dtype=torch.bool)
        return cls(method="eigh", rank=int(keep.sum()), evecs=evecs[:, keep], evals=evals[keep])

    def whiten(self, b: Tensor) -> Tensor:
        """``W b`` for ``b`` ``[d, m]`` (O(d^2 m))."""
        if self.chol is not None:
            return torch.linalg.solve_triangular(self.chol, b, upper=False)
        assert self.evecs is not None and self.evals is not None
        return self.evecs @ ((self.evecs.T @ b) * self.evals.rsqrt()[:, None])

    def whiten_t(self, u: Tensor) -> Tensor:
        """``W^T u`` for ``u`` ``[d, m]``."""
        if self.chol is not None:
            return torch.linalg.solve_triangular(self.chol.T, u, upper=True)
        return self.whiten(u)  # symmetric W

    def unwhiten(self, u: Tensor) -> Tensor:
        """``W^+ u`` for ``u`` ``[d, m]``."""
        if self.chol is not None:
            return self.chol @ u
        assert self.evecs is not None and self.evals is not None
        return self.evecs @ ((self.evecs.T @ u) * self.evals.sqrt()[:, None])


def concept_basis(sigma_zz: Tensor, mean_z: Tensor, rtol: float = 1e-10) -> Tensor:
    """A ``[k, k']`` map onto the directions in which z actually varies.

    One-hot labels always have one redundant direction (rows sum to 1), absent classes
    give constant columns and continuous concepts may be collinear. Cross-covariances along
    such directions are zero by Cauchy-Schwarz, so dropping them *before* the SVD means the
    relative SVD tolerance only ever discards genuinely weak directions (which we report).
    Columns are scaled to unit variance first so the test is blind to the units of z.

    Args:
        sigma_zz: ``[k, k]`` covariance of z.
        mean_z: ``[k]`` mean of z (decides when a column's variance is rounding noise).
        rtol: Eigenvalues of the correlation matrix at or below ``rtol * k`` are dropped.

    Returns:
        ``Q`` ``[k, k']`` such that ``Sigma_xz @ Q`` spans the same space as ``Sigma_xz``;
        ``k' = 0`` when z is constant.
    """
    var = torch.diagonal(sigma_zz).clamp_min(0)
    # A column is constant when its spread is rounding noise relative to its level.
    varies = var > (1e-10 * mean_z.abs()) ** 2
    varies &= var > 0
    k = sigma_zz.shape[0]
    idx = torch.nonzero(varies).flatten()
    if idx.numel() == 0:
        return sigma_zz.new_zeros(k, 0)
    scale = var[idx].rsqrt()
    corr = sigma_zz[idx][:, idx] * scale[:, None] * scale[None, :]
    evals, evecs = torch.linalg.eigh((corr + corr.T) / 2)
    kept = evecs[:, evals > rtol * idx.numel()]
    basis = sigma_zz.new_zeros(k, kept.shape[1])
    basis[idx] = kept * scale[:, None]
    return basis
