"""INLP: Iterative Nullspace Projection (Ravfogel et al. 2020).

Repeat: fit a linear probe for z on the current (projected) features, add its weight
directions to an orthonormal basis Q, and project the features onto the nullspace of
everything found so far. The eraser is the orthogonal projection ``x - Q Q^T (x - mu)``.
A baseline: unlike LEACE it needs the data itself (not streamed statistics), removes one
probe's worth of directions per round and has no guarantee after a fixed number of rounds.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from cdistill.erasure.base import LowRankEraser, check_finite
from cdistill.erasure.probe import class_count, fit_logistic, majority_rate
from cdistill.errors import CdistillError

log = logging.getLogger(__name__)


def orthonormal_extend(q: Tensor, directions: Tensor, rtol: float = 1e-6) -> Tensor:
    """Append the part of ``directions`` ``[d, m]`` orthogonal to ``q`` ``[d, r]`` to ``q``.

    Returns:
        ``[d, r + m']`` with orthonormal columns; directions already (numerically) in the
        span of ``q`` are skipped.
    """
    rest = directions - q @ (q.T @ directions)
    # Project twice: one Gram-Schmidt pass loses orthogonality for nearly dependent vectors.
    rest = rest - q @ (q.T @ rest)
    u, s, _ = torch.linalg.svd(rest, full_matrices=False)
    scale = float(directions.norm(dim=0).max()) if directions.numel() else 0.0
    return torch.cat([q, u[:, s > rtol * scale]], dim=1)


def fit_inlp(
    x: Tensor,
    z: Tensor,
    num_classes: int | None = None,
    *,
    n_iter: int = 20,
    affine: bool = True,
    l2: float = 1e-4,
    max_iter: int = 100,
    val_fraction: float = 0.3,
    stop_margin: float | None = None,
    seed: int = 0,
) -> LowRankEraser:
    """Fit an INLP eraser.

    Args:
        x: ``[N, d]`` features.
        z: ``[N]`` integer concept labels.
        num_classes: Number of classes (inferred from ``z`` when ``None``).
        n_iter: Maximum number of probe rounds (each removes up to ``max(1, K)`` directions).
        affine: Centre the projection on the mean of x (keeps the mean).
        l2: Probe L2 weight.
        max_iter: L-BFGS iterations per probe.
        val_fraction: Held-out share used to decide when to stop.
        stop_margin: Stop once the held-out probe accuracy is at most majority rate plus this
            margin; default one binomial standard error of the held-out split (INLP
            leaves residual signal behind when it stops too early).
        seed: Seed of the train/validation shuffle.

    Returns:
        A :class:`LowRankEraser` with ``proj_left == proj_right == Q``.
    """
    if x.ndim != 2 or z.shape != (x.shape[0],):
        raise CdistillError(
            f"INLP needs x [N, d] and z [N]; got {tuple(x.shape)}, {tuple(z.shape)}."
        )
    check_finite("x", x)
    k = class_count(z, num_classes)
    n, d = x.shape
    xf = x.to(torch.float64)
    mean = xf.mean(0) if affine else xf.new_zeros(d)
    xc = xf - mean
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).to(x.device)
    n_val = max(1, int(n * val_fraction))
    val, train = perm[:n_val], perm[n_val:]
    chance = majority_rate(z[val])
    if stop_margin is None:
        stop_margin = (chance * (1 - chance) / n_val) ** 0.5
    q = xf.new_zeros(d, 0)
    for it in range(n_iter):
        projected = xc - (xc @ q) @ q.T
        probe = fit_logistic(projected[train], z[train], k, l2=l2, max_iter=max_iter)
        acc = probe.accuracy(projected[val], z[val])
        log.debug("INLP round %d: held-out accuracy %.4f (chance %.4f)", it, acc, chance)
        if acc <= chance + stop_margin:
            break
        new_q = orthonormal_extend(q, probe.weight.to(torch.float64).T)
        if new_q.shape[1] == q.shape[1]:
            break
        q = new_q
    return LowRankEraser(q, q, mean, method="inlp")
