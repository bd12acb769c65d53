"""The losses and updates of the group-robust methods, free of Lightning (tested directly)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def generalized_cross_entropy(logits: Tensor, labels: Tensor, q: float) -> Tensor:
    """Generalised cross-entropy (Zhang and Sabuncu 2018), LfF's biased-model loss.

    ``GCE(p, y) = (1 - p_y^q) / q``: its gradient is cross-entropy's scaled by ``p_y^q``, so
    samples the model already finds easy (the bias-aligned ones) dominate, amplifying the bias.

    Args:
        logits: ``[B, K]``.
        labels: ``int64 [B]``.
        q: Exponent in ``(0, 1]`` (``q -> 0`` is cross-entropy).

    Returns:
        ``[B]`` per-sample losses.
    """
    p_y = F.softmax(logits, dim=1).gather(1, labels[:, None]).squeeze(1)  # [B]
    return (1.0 - p_y.clamp_min(1e-12) ** q) / q


def relative_difficulty(loss_biased: Tensor, loss_debiased: Tensor) -> Tensor:
    """LfF's sample weight ``W = L_B / (L_B + L_D)`` in ``[0, 1]`` (``[B]`` from two ``[B]``):
    high where the biased model fails and the debiased one does not yet succeed."""
    total = loss_biased + loss_debiased
    return torch.where(total > 0, loss_biased / total.clamp_min(1e-12), torch.full_like(total, 0.5))


def group_sums(losses: Tensor, groups: Tensor, num_slots: int) -> tuple[Tensor, Tensor]:
    """Per-group sums of ``losses [B]`` (differentiable) and counts (float) over ``num_slots``
    group slots; ``groups`` are ``int64 [B]`` in ``[0, num_slots)``."""
    sums = losses.new_zeros(num_slots).index_add(0, groups, losses)
    counts = torch.bincount(groups, minlength=num_slots)[:num_slots].to(losses.dtype)
    return sums, counts


def dro_update(q: Tensor, group_loss: Tensor, present: Tensor, eta: float) -> Tensor:
    """One exponentiated-gradient step of GroupDRO's group weights (Sagawa et al. 2020, Alg. 1).

    ``q_g <- q_g · exp(η · ℓ_g)`` for the groups seen in this batch, then renormalised to sum to 1.

    Args:
        q: ``[G]`` current weights (sum 1; 0 for groups that never occur).
        group_loss: ``[G]`` mean loss of each group in the batch (any value where not present).
        present: ``bool [G]`` groups with at least one sample in the batch.
        eta: Step size.

    Returns:
        ``[G]`` the new weights.
    """
    step = torch.where(present, eta * group_loss, torch.zeros_like(group_loss))
    # Subtracting the max before exp keeps it finite and leaves the normalised result unchanged.
    logq = torch.log(q.clamp_min(1e-30)) + step
    new = torch.exp(logq - logq.max()) * (q > 0)
    return new / new.sum()
