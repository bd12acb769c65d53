"""Accuracy per bias group: aligned vs conflicting samples and per value of the bias cue."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class BiasGroupAccuracy(Metric):
    """Accuracy split by the bias attribute.

    ``bias`` is the class the spurious cue points to under the training correlation (-1: none).
    A sample is *aligned* when ``bias == label`` and *conflicting* when ``bias >= 0`` and
    ``bias != label``. Counts are summed across DDP ranks by torchmetrics.

    Args:
        num_groups: Number of bias values (10 for the MNIST benchmarks).
    """

    full_state_update = False
    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, num_groups: int) -> None:
        super().__init__()
        self.num_groups = num_groups
        # Row 0: aligned, row 1: conflicting; column: bias value.
        self.add_state("correct", torch.zeros(2, num_groups, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(2, num_groups, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, labels: torch.Tensor, bias: torch.Tensor) -> None:
        """Count one batch.

        Args:
            preds: Predicted classes ``[B]``.
            labels: True classes ``[B]``.
            bias: Bias attribute ``[B]`` (-1 where the cue points to no class).
        """
        keep = bias >= 0
        if bool((bias >= self.num_groups).any()):
            raise ValueError(f"bias values must be < num_groups={self.num_groups}")
        row = (bias[keep] != labels[keep]).long()
        flat = row * self.num_groups + bias[keep]
        hit = (preds[keep] == labels[keep]).long()
        size = 2 * self.num_groups
        self.total += torch.bincount(flat, minlength=size).view(2, -1)
        self.correct += torch.bincount(flat, weights=hit, minlength=size).long().view(2, -1)

    def compute(self) -> dict[str, torch.Tensor]:
        """Return ``acc_aligned``, ``acc_conflicting`` and ``acc_bias<k>`` (NaN-free: empty
        groups are left out)."""
        out: dict[str, torch.Tensor] = {}
        for name, row in (("aligned", 0), ("conflicting", 1)):
            n = self.total[row].sum()
            if n > 0:
                out[f"acc_{name}"] = self.correct[row].sum().float() / n
        per_value_n = self.total.sum(0)
        per_value_c = self.correct.sum(0)
        for k in range(self.num_groups):
            if per_value_n[k] > 0:
                out[f"acc_bias{k}"] = per_value_c[k].float() / per_value_n[k]
        return out
