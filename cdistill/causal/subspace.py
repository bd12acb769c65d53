"""Orthonormal bases of subspaces for the reliance measures (:mod:`cdistill.causal.reliance`):
the span of given directions (at their numerical rank) and a seeded random span."""

from __future__ import annotations

import torch
from torch import Tensor

from cdistill.errors import CdistillError, NonFiniteError


def orthonormal_span(subspace: Tensor, what: str = "subspace") -> Tensor:
    """Orthonormal columns ``[d, r']`` (float64) spanning the columns of ``subspace [d, r]``.

    ``r'`` is the numerical rank: singular values under ``max(d, r) · eps · s_max`` (eps of the
    input's dtype) are dropped, so nearly parallel columns (two CAVs of one concept) count once.

    Raises:
        CdistillError: ``subspace`` is not ``[d]`` or ``[d, r]``, holds NaN/Inf, or is zero.
    """
    if subspace.ndim == 1:
        subspace = subspace[:, None]
    if subspace.ndim != 2 or subspace.numel() == 0:
        raise CdistillError(
            f"The {what} has shape {tuple(subspace.shape)}; pass its directions as the columns of a [d, r] tensor."
        )
    if not bool(torch.isfinite(subspace).all()):
        raise NonFiniteError(f"The {what} holds NaN/Inf: check the vectors it was built from.")
    u, s, _ = torch.linalg.svd(subspace.detach().double(), full_matrices=False)
    eps = torch.finfo(subspace.dtype if subspace.is_floating_point() else torch.float64).eps
    rank = int((s > max(subspace.shape) * eps * s[0]).sum()) if float(s[0]) > 0 else 0
    if rank == 0:
        raise CdistillError(f"The {what} is zero: it spans no direction. Pass non-zero vectors.")
    return u[:, :rank]


def random_subspace(dim: int, rank: int, seed: int) -> Tensor:
    """Orthonormal columns ``[dim, rank]`` (float64) of a uniformly random ``rank``-dim subspace."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, rank, generator=gen, dtype=torch.float64))
    return q
