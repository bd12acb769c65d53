"""Accuracy per bias group: aligned vs conflicting samples, per value of the bias cue, and per
(label, bias) group (worst-group and mean group accuracy, the GroupDRO-style measures)."""

from __future__ import annotations

import torch
from torchmetrics import Metric

from cdistill.robust.groups import group_of


class BiasGroupAccuracy(Metric):
    """Accuracy split by the bias attribute.

    ``bias`` is the class the spurious cue points to under the training correlation (-1: none).
    A sample is *aligned* when ``bias == label`` and *conflicting* when ``bias >= 0`` and
    ``bias != label``. A *group* is a pair ``(label, bias)``; samples with ``bias == -1`` belong
    to no group. Counts are summed across DDP ranks by torchmetrics.

    Args:
        num_groups: Number of bias values (10 for the MNIST benchmarks).
        num_classes: Number of labels (None: ``num_groups``), for the ``(label, bias)`` groups.
    """

    full_state_update = False
    correct: torch.Tensor
    total: torch.Tensor
    group_correct: torch.Tensor
    group_total: torch.Tensor

    def __init__(self, num_groups: int, num_classes: int | None = None) -> None:
        super().__init__()
        self.num_groups = num_groups
        self.num_classes = num_groups if num_classes is None else int(num_classes)
        # Row 0: aligned, row 1: conflicting; column: bias value.
        self.add_state("correct", torch.zeros(2, num_groups, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(2, num_groups, dtype=torch.long), dist_reduce_fx="sum")
        # Row: label, column: bias value.
        shape = (self.num_classes, num_groups)
        self.add_state("group_correct", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("group_total", torch.zeros(shape, dtype=torch.long), dist_reduce_fx="sum")

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
        if bool((labels[keep] >= self.num_classes).any()):
            raise ValueError(f"labels must be < num_classes={self.num_classes}")
        row = (bias[keep] != labels[keep]).long()
        flat = row * self.num_groups + bias[keep]
        hit = (preds[keep] == labels[keep]).long()
        size = 2 * self.num_groups
        self.total += torch.bincount(flat, minlength=size).view(2, -1)
        self.correct += torch.bincount(flat, weights=hit, minlength=size).long().view(2, -1)
        group = group_of(labels[keep], bias[keep], self.num_groups)
        n_groups = self.num_classes * self.num_groups
        self.group_total += torch.bincount(group, minlength=n_groups).view(self.num_classes, -1)
        self.group_correct += torch.bincount(group, weights=hit, minlength=n_groups).long().view(self.num_classes, -1)

    def compute(self) -> dict[str, torch.Tensor]:
        """Return ``acc_aligned``, ``acc_conflicting``, ``acc_bias<k>``, and over the non-empty
        ``(label, bias)`` groups ``acc_worst_group`` (the lowest accuracy) and
        ``acc_group_mean`` (their unweighted mean). NaN-free: empty groups are left out."""
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
        seen = self.group_total > 0
        if bool(seen.any()):
            group_acc = self.group_correct[seen].float() / self.group_total[seen]  # [G_nonempty]
            out["acc_worst_group"] = group_acc.min()
            out["acc_group_mean"] = group_acc.mean()
        return out
