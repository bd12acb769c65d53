"""Losses and metrics of intrinsic image decomposition.

* Scale-invariant MSE (Grosse et al. 2009; Barron and Malik): intrinsic images are known up
  to a scale per image (``I = R S = (a R)(S / a)``), so each prediction is first multiplied
  by the least-squares scale ``α = <p, t> / <p, p>`` (over the mask) before the MSE.
* LMSE: the same, in overlapping windows (side ``k``, step ``k / 2``), summed and divided
  by the windows' total target energy (the MIT protocol; Grosse et al. used ``k = 20`` on
  images of about 250 pixels). One ``α`` per window is shared by the channels.
* WHDR (Bell et al. 2014): weighted human disagreement rate of a reflectance map against
  IIW pairwise judgements.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cdistill.errors import CdistillError


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def ls_scale(pred: Tensor, target: Tensor, mask: Tensor | None = None, eps: float = 1e-10) -> Tensor:
    """Least-squares scale per image: ``argmin_α ||m (α p - t)||²`` (0 when ``p`` is ~0).

    Args:
        pred, target: ``[B, C, H, W]``. mask: ``[B, 1 or C, H, W]`` or None.

    Returns:
        ``[B, 1, 1, 1]``.
    """
    m = torch.ones_like(pred) if mask is None else mask.expand_as(pred)
    num = _flat(m * pred * target).sum(1)
    den = _flat(m * pred * pred).sum(1)
    alpha = torch.where(den > eps, num / den.clamp_min(eps), torch.zeros_like(num))
    return alpha.view(-1, 1, 1, 1)


def si_mse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Scale-invariant MSE per image: ``mean_m (α p - t)²`` with α from :func:`ls_scale`.

    The scale is not detached: the loss is a function of ``p`` invariant to ``p -> c p``
    (``c > 0``), and its gradient is the exact gradient of that function.

    Args:
        pred, target: ``[B, C, H, W]``. mask: ``[B, 1 or C, H, W]`` or None (all pixels).

    Returns:
        ``[B]``.
    """
    m = torch.ones_like(pred) if mask is None else mask.expand_as(pred)
    err = m * (ls_scale(pred, target, m) * pred - target) ** 2
    return _flat(err).sum(1) / _flat(m).sum(1).clamp_min(1.0)


def lmse(pred: Tensor, target: Tensor, mask: Tensor | None = None, window: int = 20) -> Tensor:
    """Local scale-invariant MSE per image (MIT protocol, see module docstring).

    Args:
        pred, target: ``[B, C, H, W]`` with ``H, W >= window``.
        mask: ``[B, 1, H, W]`` or None.
        window: Window side ``k`` (step ``k // 2``).

    Returns:
        ``[B]``: ``Σ_w min_α ||m_w (α p_w - t_w)||² / Σ_w ||m_w t_w||²`` (0 for an all-zero target).
    """
    b, _, h, w = pred.shape
    if min(h, w) < window:
        raise CdistillError(f"LMSE window {window} is larger than the {h}x{w} images; lower the window.")
    m = torch.ones_like(pred[:, :1]) if mask is None else mask[:, :1]
    step = max(window // 2, 1)

    def windows(x: Tensor) -> Tensor:  # [B, C, H, W] -> [B * L, C, k, k]
        cols = F.unfold(x, window, stride=step)  # [B, C*k*k, L]
        n = cols.shape[-1]
        return cols.transpose(1, 2).reshape(b * n, x.shape[1], window, window)

    pw, tw, mw = windows(pred), windows(target), windows(m)
    alpha = ls_scale(pw, tw, mw)
    ssq = _flat(mw * (alpha * pw - tw) ** 2).sum(1).view(b, -1).sum(1)
    total = _flat(mw * tw**2).sum(1).view(b, -1).sum(1)
    return torch.where(total > 0, ssq / total.clamp_min(1e-12), torch.zeros_like(ssq))


Comparison = tuple[int, int, str, float]


def whdr(
    reflectance: Tensor,
    points: Mapping[int, tuple[float, float, bool]],
    comparisons: Sequence[Comparison],
    delta: float = 0.10,
) -> float:
    """Weighted human disagreement rate of one reflectance map (Bell et al. 2014).

    For each judgement, the map's intensity (channel mean) at the two points decides:
    point 1 darker when ``r2 / r1 > 1 + δ``, point 2 darker when ``r1 / r2 > 1 + δ``, equal
    otherwise; the error is the ``darker_score``-weighted fraction of judgements it
    contradicts. Judgements with a non-positive weight or a non-opaque point are skipped.

    Args:
        reflectance: ``[C, H, W]`` or ``[H, W]``.
        points: ``{id: (x, y, opaque)}``, coordinates in ``[0, 1]`` (x along width).
        comparisons: ``(point1, point2, darker in {"1", "2", "E"}, darker_score)``.
        delta: Relative difference below which two points count as equal.

    Returns:
        WHDR in ``[0, 1]``.

    Raises:
        CdistillError: No judgement has a positive weight.
    """
    r = reflectance if reflectance.ndim == 3 else reflectance[None]
    lum = r.float().mean(0)
    rows, cols = lum.shape
    err = total = 0.0
    for p1, p2, darker, weight in comparisons:
        if weight is None or weight <= 0 or darker not in ("1", "2", "E"):
            continue
        (x1, y1, o1), (x2, y2, o2) = points[p1], points[p2]
        if not (o1 and o2):
            continue
        l1 = max(1e-10, float(lum[min(int(y1 * rows), rows - 1), min(int(x1 * cols), cols - 1)]))
        l2 = max(1e-10, float(lum[min(int(y2 * rows), rows - 1), min(int(x2 * cols), cols - 1)]))
        alg = "1" if l2 / l1 > 1 + delta else "2" if l1 / l2 > 1 + delta else "E"
        err += weight if alg != darker else 0.0
        total += weight
    if total == 0:
        raise CdistillError("WHDR: no judgement with a positive darker_score between opaque points.")
    return err / total
