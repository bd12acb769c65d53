"""A small torch logistic-regression probe (used by INLP, RLACE and to score erasure).

Full-batch L-BFGS on the (L2-regularised) cross-entropy. Binary problems use one logit,
so a binary probe has exactly one direction; K classes use K logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cdistill.errors import CdistillError


@dataclass
class LinearProbe:
    """A fitted linear classifier.

    Attributes:
        weight: ``[c, d]`` with c = 1 for binary problems, else the number of classes.
        bias: ``[c]``.
    """

    weight: Tensor
    bias: Tensor

    def logits(self, x: Tensor) -> Tensor:
        """``[N, c]`` scores for ``x`` ``[N, d]``."""
        return x.to(self.weight) @ self.weight.T + self.bias

    def predict(self, x: Tensor) -> Tensor:
        """``[N]`` predicted class ids."""
        s = self.logits(x)
        return (s[:, 0] > 0).long() if s.shape[1] == 1 else s.argmax(1)

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        """Fraction of ``x`` ``[N, d]`` classified as ``y`` ``[N]``."""
        return float((self.predict(x) == y.to(self.weight.device)).float().mean())


def class_count(y: Tensor, num_classes: int | None) -> int:
    """Validate integer labels ``y`` ``[N]`` and return the number of classes."""
    if y.is_floating_point() or y.ndim != 1:
        raise CdistillError(
            f"Probes need integer class ids of shape [N]; got {y.dtype} {tuple(y.shape)}."
        )
    k = int(y.max()) + 1 if num_classes is None else num_classes
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise CdistillError(f"Labels must lie in [0, {k}); got [{int(y.min())}, {int(y.max())}].")
    return max(k, 2)


def fit_logistic(
    x: Tensor,
    y: Tensor,
    num_classes: int | None = None,
    *,
    l2: float = 1e-4,
    max_iter: int = 100,
    dtype: torch.dtype = torch.float32,
) -> LinearProbe:
    """Fit an L2-regularised logistic regression with L-BFGS.

    Args:
        x: ``[N, d]`` features (any float dtype; optimised in ``dtype``).
        y: ``[N]`` integer class ids.
        num_classes: Number of classes; inferred from ``y`` when ``None``.
        l2: Weight of ``0.5 * ||W||^2`` (features are rescaled to unit RMS inside, so this
            is scale-free).
        max_iter: L-BFGS iterations.
        dtype: Optimisation dtype.

    Returns:
        The probe, expressed in the original feature scale.
    """
    k = class_count(y, num_classes)
    xf = x.to(dtype)
    mean = xf.mean(0)
    scale = (xf - mean).pow(2).mean().sqrt().clamp_min(torch.finfo(dtype).tiny)
    xs = (xf - mean) / scale
    c = 1 if k == 2 else k
    w = torch.zeros(c, x.shape[1], dtype=dtype, device=x.device, requires_grad=True)
    b = torch.zeros(c, dtype=dtype, device=x.device, requires_grad=True)
    yy = y.to(x.device)
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-6
    )

    def closure() -> Tensor:
        opt.zero_grad()
        s = xs @ w.T + b
        if c == 1:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(s[:, 0], yy.to(dtype))
        else:
            loss = torch.nn.functional.cross_entropy(s, yy)
        loss = loss + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weight = w.detach() / scale
    return LinearProbe(weight=weight, bias=b.detach() - weight @ mean)


def majority_rate(y: Tensor) -> float:
    """Accuracy of always predicting the most frequent class in ``y`` ``[N]``."""
    return float(torch.bincount(y.long()).max()) / max(y.numel(), 1)
