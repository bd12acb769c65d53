"""RLACE: Relaxed Linear Adversarial Concept Erasure (Ravfogel et al. 2022).

A min-max game between a linear predictor theta of z and a rank-k orthogonal projection
that removes directions from x:

    max_{A}  min_theta  loss(theta; x (I - A)),    A in the Fantope
    F_k = {A symmetric, 0 <= A <= I, tr A = k}

(the convex hull of rank-k projections). We alternate steps: the predictor descends (Adam),
A ascends (plain SGD) and is then projected back onto F_k (:func:`fantope_project`). Every
``eval_every`` steps the current A is rounded to a hard rank-k projection (its top-k
eigenvectors), a fresh probe is fitted on the projected data, and the rounding that leaves
the probe with the highest loss is kept. The eraser is ``x - U U^T (x - mu)``.
A baseline: minutes where LEACE takes milliseconds, and no closed-form guarantee.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from cdistill.erasure.base import LowRankEraser, check_finite
from cdistill.erasure.probe import class_count, fit_logistic
from cdistill.errors import CdistillError

log = logging.getLogger(__name__)


def fantope_project(a: Tensor, k: int) -> Tensor:
    """Euclidean projection of a symmetric matrix onto the Fantope F_k.

    With ``a = V diag(lam) V^T`` the projection is ``V diag(clip(lam - g, 0, 1)) V^T`` for the
    shift g at which the clipped eigenvalues sum to k. ``f(g) = sum(clip(lam - g, 0, 1))``
    is piecewise linear and non-increasing with kinks at ``lam_i`` and ``lam_i - 1``, so we
    evaluate it at all kinks at once, bisect the sorted kinks (``searchsorted``) for the
    segment where it crosses k, and solve that linear piece exactly: no iteration tolerance
    and no per-step Python loop.

    Args:
        a: ``[d, d]`` matrix (symmetrised first).
        k: Trace of the result, ``0 < k <= d``.

    Returns:
        ``[d, d]`` symmetric matrix with eigenvalues in [0, 1] summing to k.
    """
    lam, vec = torch.linalg.eigh((a + a.T) / 2)
    kinks = torch.cat([lam, lam - 1]).sort().values  # ascending g; f descending
    f = (lam[None, :] - kinks[:, None]).clamp(0, 1).sum(1)
    # First kink with f <= k (f[0] = d >= k at the lowest kink, f[-1] = 0 at the highest).
    j = int(torch.searchsorted(-f, torch.tensor([-float(k)], dtype=f.dtype, device=f.device)))
    j = min(max(j, 1), f.numel() - 1)
    g0, g1, f0, f1 = kinks[j - 1], kinks[j], f[j - 1], f[j]
    gamma = g1 if bool(f0 == f1) else g0 + (f0 - k) * (g1 - g0) / (f0 - f1)
    return (vec * (lam - gamma).clamp(0, 1)) @ vec.T


def _top_k(a: Tensor, k: int) -> Tensor:
    """``[d, k]`` orthonormal top-k eigenvectors of the symmetric ``a``."""
    _, vec = torch.linalg.eigh((a + a.T) / 2)
    return vec[:, -k:]


def _loss(logits: Tensor, y: Tensor) -> Tensor:
    if logits.shape[1] == 1:
        return nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.to(logits.dtype))
    return nn.functional.cross_entropy(logits, y)


def _standardise(x: Tensor, affine: bool) -> tuple[Tensor, Tensor]:
    """``x [N, d]`` centred (on its mean when ``affine``) and scaled to unit RMS, in float32,
    and the float64 mean ``[d]`` (zeros without ``affine``)."""
    x64 = x.to(torch.float64)
    mean = x64.mean(0) if affine else x64.new_zeros(x.shape[1])
    xs = (x64 - mean).to(torch.float32)  # centre in float64: offsets would eat float32 digits
    # A global scale leaves orthogonal projections unchanged but makes step sizes scale-free.
    return xs / xs.pow(2).mean().sqrt().clamp_min(1e-12), mean


def _fresh_probe_score(xs: Tensor, y_fit: Tensor, y_eval: Tensor, k: int, u: Tensor) -> tuple[float, float]:
    """Loss and accuracy of a fresh probe fitted on the first ``len(y_fit)`` rows of ``xs`` with
    the directions ``u [d, rank]`` projected out, evaluated on the rest."""
    xp = xs - (xs @ u) @ u.T
    half = len(y_fit)
    probe = fit_logistic(xp[:half], y_fit, k, max_iter=50)
    with torch.no_grad():
        loss = float(_loss(probe.logits(xp[half:]), y_eval))
    return loss, probe.accuracy(xp[half:], y_eval)


def fit_rlace(
    x: Tensor,
    z: Tensor,
    num_classes: int | None = None,
    *,
    rank: int = 1,
    n_steps: int = 2000,
    batch_size: int = 256,
    lr_proj: float = 0.1,
    lr_clf: float = 3e-3,
    clf_steps: int = 1,
    eval_every: int = 250,
    affine: bool = True,
    seed: int = 0,
) -> LowRankEraser:
    """Fit an RLACE eraser of a given rank.

    Args:
        x: ``[N, d]`` features.
        z: ``[N]`` integer concept labels.
        num_classes: Number of classes (inferred when ``None``).
        rank: Number of directions to remove (k; ``num_classes - 1`` is the natural choice).
        n_steps: Game steps (each: ``clf_steps`` predictor steps, one projection step).
        batch_size: Minibatch size of each step.
        lr_proj: SGD learning rate of the relaxed projection A (features are rescaled to
            unit RMS first, so this is scale-free).
        lr_clf: Adam learning rate of the predictor.
        clf_steps: Predictor steps per projection step.
        eval_every: Steps between hard roundings scored by a freshly fitted probe.
        affine: Centre the projection on the mean of x.
        seed: Seed of the initialisation and minibatch order.

    Returns:
        A :class:`LowRankEraser` with ``proj_left == proj_right == U`` ``[d, rank]``.
    """
    if x.ndim != 2 or z.shape != (x.shape[0],):
        raise CdistillError(
            f"RLACE needs x [N, d] and z [N]; got {tuple(x.shape)}, {tuple(z.shape)}."
        )
    check_finite("x", x)
    n, d = x.shape
    if not 0 < rank < d:
        raise CdistillError(f"RLACE rank must lie in [1, {d - 1}]; got {rank}.")
    k = class_count(z, num_classes)
    gen = torch.Generator().manual_seed(seed)
    xs, mean = _standardise(x, affine)
    y = z.to(x.device).long()
    c = 1 if k == 2 else k

    clf = nn.Linear(d, c).to(xs)
    nn.init.zeros_(clf.weight)  # deterministic start (no global RNG)
    nn.init.zeros_(clf.bias)
    # Start at the centre of the Fantope: every direction removed by the same amount k/d.
    a = (torch.eye(d) * (rank / d)).to(xs).requires_grad_()
    opt_clf = torch.optim.Adam(clf.parameters(), lr=lr_clf)
    opt_a = torch.optim.SGD([a], lr=lr_proj, maximize=True)
    eye = torch.eye(d, dtype=xs.dtype, device=xs.device)

    # Score roundings with a fresh probe fitted on one half and evaluated on the other half:
    # training accuracy would flatter the probe by overfitting at large d.
    perm = torch.randperm(n, generator=gen)[: min(n, 4000)].to(x.device)
    fit_idx, eval_idx = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    best_u, best_loss = _top_k(a.detach(), rank), -float("inf")

    with torch.enable_grad():
        for step in range(1, n_steps + 1):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(x.device)
            xb, yb = xs[idx], y[idx]
            for _ in range(clf_steps):
                opt_clf.zero_grad()
                _loss(clf(xb @ (eye - a.detach())), yb).backward()
                opt_clf.step()
            opt_a.zero_grad()
            _loss(clf(xb @ (eye - a)), yb).backward()
            opt_a.step()
            with torch.no_grad():
                a.copy_(fantope_project(a, rank))
            if step % eval_every == 0 or step == n_steps:
                u = _top_k(a.detach(), rank)
                loss, acc = _fresh_probe_score(xs[perm], y[fit_idx], y[eval_idx], k, u)
                log.debug("RLACE step %d: fresh-probe loss %.4f acc %.4f", step, loss, acc)
                if loss > best_loss:
                    best_u, best_loss = u, loss
    u64 = best_u.to(torch.float64)
    return LowRankEraser(u64, u64, mean, method="rlace")
