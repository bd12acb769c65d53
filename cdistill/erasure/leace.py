"""LEACE: least-squares affine concept erasure in closed form (Belrose et al. 2023).

Given the covariance ``Sigma_xx`` of features x and their cross-covariance ``Sigma_xz``
with a concept z, the eraser

    r(x) = x - P (x - mu_x),    P = W^+ Proj(W Sigma_xz) W,    W^T W = Sigma_xx^{-1}

is the smallest edit (in mean squared distance measured in the whitened metric, and in
fact in every norm, see the paper) after which ``Cov(r(x), z) = 0``: no linear classifier
can predict z from r(x) better than a constant. P has rank at most k (k - 1 for one-hot
labels of k classes) and is stored as ``P = proj_left @ proj_right.T``.

Usage::

    fitter = LeaceFitter(d, num_classes=10)
    for x, y in loader:
        fitter.update(x, y)
    fitter.all_reduce_()          # under DDP; no-op otherwise
    eraser = fitter.build()       # small frozen nn.Module, apply with eraser(x)
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from cdistill.erasure.base import LowRankEraser
from cdistill.erasure.linalg import Whitener, WhiteningMethod, concept_basis, shrink
from cdistill.erasure.moments import CrossMoments
from cdistill.errors import CdistillError

log = logging.getLogger(__name__)

LeaceMethod = Literal["leace", "orth"]


@dataclass
class LeaceInfo:
    """How an eraser was built (kept as a plain attribute, not in ``state_dict``).

    Attributes:
        method: ``"leace"`` or ``"orth"``.
        rank: Number of directions erased.
        n_dropped: Directions whose singular value fell at or below ``svd_tol * s_max``.
        singular_values: All singular values of the (whitened, for ``leace``) cross-covariance
            with the concept columns scaled to unit variance, descending.
        whitening: ``"cholesky"``, ``"eigh"`` or ``"none"`` (orth).
        whitened_rank: Directions of x with non-negligible variance.
        shrinkage: Intensity used to shrink ``Sigma_xx`` (0 for none).
        n: Number of samples the statistics came from.
    """

    method: str
    rank: int
    n_dropped: int
    singular_values: list[float] = field(default_factory=list)
    whitening: str = "none"
    whitened_rank: int = 0
    shrinkage: float = 0.0
    n: int = 0


class LeaceEraser(LowRankEraser):
    """Frozen LEACE eraser ``r(x) = x - proj_left @ proj_right.T @ (x - bias)``.

    Buffers: ``proj_left [d, r]``, ``proj_right [d, r]``, ``bias [d]`` (the mean of x for
    affine erasers, zeros otherwise). See :class:`LowRankEraser` for dtype handling.
    """

    #: The fit's diagnostics (set by :meth:`LeaceFitter.build`; ``None`` for a bare eraser).
    info: LeaceInfo | None = None


class LeaceFitter(CrossMoments):
    """Accumulates float64 statistics of (x, z) and builds a :class:`LeaceEraser`.

    The statistics are buffers of :class:`CrossMoments` (saved in ``state_dict``, summable
    across ranks with :meth:`all_reduce_`, combinable with :meth:`merge`).

    Args:
        x_dim: Number of features d.
        z_dim: Number of concept columns k for continuous z; defaults to ``num_classes``
            or 1.
        num_classes: Class count for integer labels, which are then one-hot encoded.
        method: ``"leace"`` (least-squares oblique projection in the whitened metric) or
            ``"orth"`` (orthogonal projection onto the complement of span(Sigma_xz); no
            whitening, larger edits).
        affine: Centre the edit on the mean of x (``x - P (x - mu)``, keeps the mean). With
            ``affine=False`` the edit is ``x - P x`` and, as the least-squares optimum for a
            linear map, whitens with the uncentred second moment ``E[x x^T]``.
        shrinkage: Shrink the x covariance towards a scaled identity before whitening:
            ``False``, ``True`` (OAS intensity, see :func:`linalg.oas_shrinkage`) or a fixed
            float in [0, 1]. Useful when n is not much larger than d.
        svd_tol: Relative tolerance: directions of ``W Sigma_xz`` whose singular value is at
            or below ``svd_tol * s_max`` are not erased (and reported).
        whitening: ``"auto"`` (Cholesky when Sigma_xx is well conditioned, else one
            eigendecomposition with a pseudo-inverse), ``"cholesky"`` or ``"eigh"``.
        eig_rtol: Eigenvalues at or below ``eig_rtol * lambda_max`` are null directions;
            default ``d * eps``.
        device: Device of the statistics.
        dtype: Dtype of the statistics (float64 by default, whatever the input dtype).
    """

    def __init__(
        self,
        x_dim: int,
        z_dim: int | None = None,
        num_classes: int | None = None,
        *,
        method: LeaceMethod = "leace",
        affine: bool = True,
        shrinkage: bool | float = False,
        svd_tol: float = 1e-7,
        whitening: WhiteningMethod = "auto",
        eig_rtol: float | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__(x_dim, z_dim, num_classes, device=device, dtype=dtype)
        if method not in ("leace", "orth"):
            raise CdistillError(f"Unknown LEACE method {method!r}; use 'leace' or 'orth'.")
        if whitening not in ("auto", "cholesky", "eigh"):
            raise CdistillError(
                f"Unknown whitening {whitening!r}; use 'auto', 'cholesky' or 'eigh'."
            )
        if not 0.0 <= svd_tol < 1.0:
            raise CdistillError(f"svd_tol is relative and must lie in [0, 1); got {svd_tol}.")
        self.method: LeaceMethod = method
        self.affine = affine
        self.shrinkage = shrinkage
        self.svd_tol = svd_tol
        self.whitening: WhiteningMethod = whitening
        self.eig_rtol = eig_rtol

    @classmethod
    def fit(cls, x: Tensor, z: Tensor, **kwargs: Any) -> LeaceFitter:
        """Build a fitter from one batch: ``LeaceFitter.fit(x [N, d], z, num_classes=K)``."""
        fitter = cls(x.shape[-1], **kwargs)
        fitter.update(x, z)
        return fitter

    def _empty_like(self) -> LeaceFitter:
        return LeaceFitter(
            self.x_dim,
            self.z_dim,
            self.num_classes,
            method=self.method,
            affine=self.affine,
            shrinkage=self.shrinkage,
            svd_tol=self.svd_tol,
            whitening=self.whitening,
            eig_rtol=self.eig_rtol,
            device=self.sum_xx.device,
            dtype=self.sum_xx.dtype,
        )

    def concept_cross_cov(self) -> Tensor:
        """``[d, k']`` cross-covariance restricted to the directions in which z varies.

        Raises:
            CdistillError: If z is constant on the fitted data (nothing can be erased).
        """
        basis = concept_basis(self.sigma_zz(), self.mean_z())
        if basis.shape[1] == 0:
            raise CdistillError(
                "The concept is constant on the fitted data (every sample has the same label "
                "or value), so there is nothing to erase. Check that the fitting data covers "
                "more than one class."
            )
        return self.sigma_xz() @ basis

    @torch.no_grad()
    def build(self) -> LeaceEraser:
        """Compute the eraser from the current statistics.

        Cost: one Cholesky factorisation (or one eigendecomposition when Sigma_xx is singular)
        plus O(d^2 k) products; no d x d x d matrix products.

        Returns:
            A :class:`LeaceEraser` with float64 factors on the statistics' device.

        Raises:
            CdistillError: Fewer than 2 samples, or a constant concept.

        Warns:
            UserWarning: When ``svd_tol`` drops directions, and when x carries no linear
            information about z at all (the eraser is then the identity).
        """
        n = self._need(2)
        b = self.concept_cross_cov()
        if self.affine:
            cov, bias = self.sigma_xx(), self.mean_x()
        else:
            cov, bias = self.second_moment_x(), torch.zeros_like(self.shift_x)

        info = LeaceInfo(method=self.method, rank=0, n_dropped=0, n=n)
        if self.method == "leace":
            cov, info.shrinkage = shrink(cov, n, self.shrinkage)
            whitener = Whitener.from_cov(cov, self.eig_rtol, self.whitening)
            info.whitening, info.whitened_rank = whitener.method, whitener.rank
            c = whitener.whiten(b)
        else:
            whitener, c = None, b
            info.whitened_rank = self.x_dim

        u, s, _ = torch.linalg.svd(c, full_matrices=False)
        info.singular_values = s.tolist()
        s_max = float(s[0]) if s.numel() else 0.0
        if s_max == 0.0:
            warnings.warn(
                "x carries no linear information about the concept (zero cross-covariance); "
                "returning an identity eraser.",
                stacklevel=2,
            )
            return self._eraser(u[:, :0], u[:, :0], bias, info)
        keep = s > self.svd_tol * s_max
        info.rank = int(keep.sum())
        info.n_dropped = int((~keep).sum())
        if info.n_dropped:
            weakest = float(s[~keep].max()) / s_max
            msg = (
                f"LEACE: svd_tol={self.svd_tol:g} dropped {info.n_dropped} of {s.numel()} "
                f"concept direction(s) (strongest dropped s/s_max = {weakest:.2e}); they stay "
                "linearly predictable. Lower svd_tol to erase them."
            )
            log.warning(msg)
            warnings.warn(msg, stacklevel=2)
        u = u[:, keep]
        if whitener is None:
            return self._eraser(u, u, bias, info)
        # P = W^+ U U^T W  ->  left = W^+ U, right = W^T U.
        return self._eraser(whitener.unwhiten(u), whitener.whiten_t(u), bias, info)

    def _eraser(self, left: Tensor, right: Tensor, bias: Tensor, info: LeaceInfo) -> LeaceEraser:
        eraser = LeaceEraser(left, right, bias, method=self.method if self.affine else f"{self.method}-linear")
        eraser.info = info
        return eraser

    @property
    def eraser(self) -> LeaceEraser:
        """Alias of :meth:`build` (the name the ``concept-erasure`` package uses)."""
        return self.build()
