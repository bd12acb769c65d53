"""A sample's group, defined once: the pair ``(label, bias)``.

``bias`` is the class the spurious cue points to under the training correlation (-1: none, or
unknown), so the group of a sample is ``label · B + bias`` with ``B`` the number of bias values,
and a sample with ``bias == -1`` belongs to no group (-1). The per-group accuracies of
:class:`cdistill.tasks.metrics.BiasGroupAccuracy`, the group-balanced sampler, GroupDRO, group
reweighting and DFR's balanced held-out set all use :func:`group_of`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cdistill.errors import CdistillError

log = logging.getLogger(__name__)


def num_groups(num_classes: int, num_bias_groups: int) -> int:
    """Number of ``(label, bias)`` groups: ``num_classes · num_bias_groups``."""
    return int(num_classes) * int(num_bias_groups)


def group_of(labels: Tensor, bias: Tensor, num_bias_groups: int) -> Tensor:
    """The group of each sample.

    Args:
        labels: ``int64 [N]`` classes.
        bias: ``int64 [N]`` the class the cue points to, or -1 (no group).
        num_bias_groups: ``B``, the number of bias values.

    Returns:
        ``int64 [N]``: ``label · B + bias``, or -1 where ``bias < 0``.
    """
    groups = labels.long() * int(num_bias_groups) + bias.long()
    return torch.where(bias < 0, torch.full_like(groups, -1), groups)


def describe_group(group: int, num_bias_groups: int) -> str:
    """``"(label 3, bias 7)"`` for a group index (``"(no group)"`` for -1)."""
    if group < 0:
        return "(no group)"
    return f"(label {group // num_bias_groups}, bias {group % num_bias_groups})"


@dataclass(frozen=True)
class GroupTable:
    """The labels and bias values of a split, without its images.

    Attributes:
        labels: ``int64 [N]``.
        bias: ``int64 [N]`` (-1: no group).
    """

    labels: Tensor
    bias: Tensor

    def groups(self, num_bias_groups: int) -> Tensor:
        """``int64 [N]`` :func:`group_of` of every sample."""
        return group_of(self.labels, self.bias, num_bias_groups)


def train_groups(dataset: Any, where: str = "the training split") -> GroupTable:
    """The labels and bias values of a dataset that keeps them as ``labels``/``bias`` tensors
    (every cdistill datamodule's datasets do), without reading an image.

    Raises:
        CdistillError: The dataset does not expose them.
    """
    labels, bias = getattr(dataset, "labels", None), getattr(dataset, "bias", None)
    if not (isinstance(labels, Tensor) and isinstance(bias, Tensor) and labels.shape == bias.shape):
        raise CdistillError(
            f"{where} ({type(dataset).__name__}) does not expose `labels` and `bias` tensors of one length, "
            "which group-based methods and samplers need: use a cdistill datamodule (e.g. data=folder)."
        )
    return GroupTable(labels.long().cpu(), bias.long().cpu())


def group_counts(groups: Tensor, total: int) -> Tensor:
    """``int64 [total]`` samples per group (samples of no group, -1, are not counted)."""
    kept = groups[groups >= 0]
    return torch.bincount(kept, minlength=total)[:total]


def log_absent_groups(counts: Tensor, num_bias_groups: int, what: str) -> None:
    """One log line naming how many groups have no sample (they cannot be drawn or weighted)."""
    absent = (counts == 0).nonzero().flatten().tolist()
    if absent:
        examples = ", ".join(describe_group(g, num_bias_groups) for g in absent[:3])
        log.info("%s: %d of %d (label, bias) groups have no training sample and are left out (e.g. %s); "
                 "data.conflicting_fraction > 0 puts bias-conflicting samples in the training split.",
                 what, len(absent), counts.numel(), examples)


def balanced_weights(table: GroupTable, by: str, num_classes: int, num_bias_groups: int) -> Tensor:
    """Per-sample weights under which every present group (``by="group"``) or class
    (``by="class"``) has the same total weight: ``1 / count`` of the sample's key.

    Samples of no group (bias -1) form one extra key of their own under ``by="group"``.

    Returns:
        ``float64 [N]`` positive weights.
    """
    if by == "group":
        keys = table.groups(num_bias_groups)
        total = num_groups(num_classes, num_bias_groups)
        log_absent_groups(group_counts(keys, total), num_bias_groups, "group_balanced")
        none = int((keys < 0).sum())
        if none:
            log.info("group_balanced: %d training samples have no group (bias -1): drawn as one extra group.", none)
        keys = torch.where(keys < 0, torch.full_like(keys, total), keys)
    elif by == "class":
        keys = table.labels
    else:
        raise CdistillError(f"Balancing by {by!r}: use group or class.")
    counts = torch.bincount(keys).to(torch.float64)
    return 1.0 / counts[keys]
