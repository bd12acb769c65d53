"""DFR's last-layer retraining (Kirichenko et al. 2022): an L2 logistic regression on frozen
features of a group-balanced held-out set, its strength chosen on part of that set.

Free of Lightning: :func:`fit_dfr_head` takes features, labels and groups and returns the new
weight and bias of the student's final linear layer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdistill.errors import CdistillError
from cdistill.objective.config import DFRConfig

log = logging.getLogger(__name__)


def final_linear(student: nn.Module, num_classes: int) -> nn.Linear:
    """The student's last ``nn.Linear`` with ``num_classes`` outputs (its classifier head).

    Raises:
        CdistillError: There is none.
    """
    heads = [m for m in student.modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not heads:
        raise CdistillError(
            f"DFR retrains the student's final nn.Linear with {num_classes} outputs, and "
            f"{type(student).__name__} has none: use a student whose logits come from a linear layer "
            "(mnist_cnn, timm:/torchvision: models)."
        )
    return heads[-1]


def balanced_indices(groups: Tensor, per_group: int, generator: torch.Generator) -> Tensor:
    """``per_group`` random indices of every present group (``groups >= 0``), sorted.

    Args:
        groups: ``int64 [N]`` group of each sample (-1: none, never drawn).
        per_group: Samples drawn from each group (at most its size).
        generator: The only randomness.
    """
    picked = []
    for g in torch.unique(groups[groups >= 0]).tolist():
        members = (groups == g).nonzero().flatten()
        order = torch.randperm(members.numel(), generator=generator)
        picked.append(members[order[:per_group]])
    return torch.cat(picked).sort().values if picked else torch.zeros(0, dtype=torch.long)


def split_by_group(groups: Tensor, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Each present group's samples cut in two (``fraction`` of each in the first part)."""
    first, second = [], []
    for g in torch.unique(groups[groups >= 0]).tolist():
        members = (groups == g).nonzero().flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        cut = max(1, min(members.numel() - 1, round(fraction * members.numel()))) if members.numel() > 1 else 1
        first.append(members[:cut])
        second.append(members[cut:])
    return torch.cat(first).sort().values, torch.cat(second).sort().values


def fit_logistic(x: Tensor, y: Tensor, num_classes: int, l2: float, max_iter: int) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression ``min mean CE(x W^T + b, y) + l2 ||W||²`` by LBFGS, from zero.

    Args:
        x: ``[n, d]`` (standardised) features.
        y: ``int64 [n]``.

    Returns:
        ``(W [K, d], b [K])``.
    """
    # Lightning tests under inference mode: leave it (and copy the inputs out of it) to differentiate.
    with torch.inference_mode(False), torch.enable_grad():
        x, y = x.clone(), y.clone()
        w = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device, requires_grad=True)
        b = torch.zeros(num_classes, dtype=x.dtype, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(x @ w.T + b, y) + l2 * (w * w).sum()
            loss.backward()
            return loss

        opt.step(closure)
    return w.detach(), b.detach()


def worst_group_accuracy(logits: Tensor, labels: Tensor, groups: Tensor) -> float:
    """The lowest accuracy over the present groups."""
    hit = (logits.argmax(1) == labels).float()
    return min(float(hit[groups == g].mean()) for g in torch.unique(groups[groups >= 0]).tolist())


@dataclass(frozen=True)
class DFRHead:
    """A retrained head in the student's own feature space (standardisation folded in).

    Attributes:
        weight: ``[K, d]``.
        bias: ``[K]``.
        l2: The chosen L2 strength.
        tune_worst_acc: Worst-group accuracy of that strength on the scoring part.
        heldout_size: Samples in the balanced held-out set of the final fits.
    """

    weight: Tensor
    bias: Tensor
    l2: float
    tune_worst_acc: float
    heldout_size: int


def fit_dfr_head(features: Tensor, labels: Tensor, groups: Tensor, num_classes: int, cfg: DFRConfig,
                 generator: torch.Generator) -> DFRHead:
    """Retrain the last layer as DFR does.

    1. The features are standardised (mean and std over the held-out set).
    2. ``λ`` is chosen from ``cfg.l2_grid``: each present group is cut into a fitting part
       (``cfg.tune_fraction``) and a scoring part; a logistic regression is fitted on a
       group-balanced subset of the fitting part for every ``λ``, scored by worst-group
       accuracy on the scoring part (ties: the stronger ``λ``).
    3. With that ``λ``, ``cfg.num_fits`` regressions on balanced subsets of the whole held-out
       set (each group cut to the same size, at most ``cfg.heldout_size`` in all) are averaged.

    Args:
        features: ``[N, d]`` inputs of the final linear layer on the held-out images.
        labels: ``int64 [N]``.
        groups: ``int64 [N]`` groups (-1: no group, left out).
        num_classes: ``K``.
        cfg: The settings.
        generator: The only randomness.

    Groups with a single held-out sample are left out (a log line says how many).

    Raises:
        CdistillError: No group with two samples, or ``heldout_size`` below the number of groups.
    """
    keep = groups >= 0
    present, sizes = torch.unique(groups[keep], return_counts=True)
    single = present[sizes < 2]
    if single.numel():  # a group of one can be neither split for tuning nor balanced against
        log.info("DFR: %d held-out (label, bias) groups have a single sample and are left out.", single.numel())
        keep &= ~torch.isin(groups, single)
    features, labels, groups = features[keep].double(), labels[keep], groups[keep]
    present, sizes = torch.unique(groups, return_counts=True)
    if present.numel() == 0:
        raise CdistillError(
            "DFR needs a (label, bias) group with at least two held-out samples (model.dfr.splits), and "
            "there is none: enlarge the validation splits (or give their samples a bias value other than -1)."
        )
    per_group = int(sizes.min())
    if cfg.heldout_size is not None:
        if cfg.heldout_size < present.numel():
            raise CdistillError(
                f"model.dfr.heldout_size={cfg.heldout_size} is below the {present.numel()} held-out groups: "
                f"give at least one sample per group (model.dfr.heldout_size>={present.numel()})."
            )
        per_group = min(per_group, cfg.heldout_size // present.numel())
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std

    fit_part, score_part = split_by_group(groups, cfg.tune_fraction, generator)
    tune_per_group = max(1, round(per_group * cfg.tune_fraction))
    tune_idx = fit_part[balanced_indices(groups[fit_part], tune_per_group, generator)]
    best: tuple[float, float] | None = None
    for l2 in sorted(cfg.l2_grid, reverse=True):  # strongest first: ties keep the stronger
        w, b = fit_logistic(x[tune_idx], labels[tune_idx], num_classes, l2, cfg.max_iter)
        score = worst_group_accuracy(x[score_part] @ w.T + b, labels[score_part], groups[score_part]) \
            if score_part.numel() else 0.0
        if best is None or score > best[1]:
            best = (l2, score)
    assert best is not None
    l2, score = best
    ws, bs = [], []
    for _ in range(cfg.num_fits):
        idx = balanced_indices(groups, per_group, generator)
        w, b = fit_logistic(x[idx], labels[idx], num_classes, l2, cfg.max_iter)
        ws.append(w)
        bs.append(b)
    w, b = torch.stack(ws).mean(0), torch.stack(bs).mean(0)
    # Fold the standardisation in: W (f - μ)/σ + b = (W/σ) f + (b - (W/σ) μ).
    weight = w / std
    bias = b - weight @ mean
    return DFRHead(weight.float(), bias.float(), l2, score, per_group * int(present.numel()))
