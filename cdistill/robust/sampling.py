"""What the training loader draws when it does not simply shuffle: a :class:`SamplePlan`.

The plan is plain data (``cdistill`` never imports ``datamodules``): the datamodules'
``train_dataloader`` turns it into a sampler whose draw is a pure function of ``(seed, epoch)``
(:class:`datamodules.sampler.PlannedEpochSampler`). A plan comes from the data option
``data.sampler`` (:func:`balanced_plan`) or from the task (``train_sample_plan``, e.g. JTT's
upsampled error set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cdistill.errors import CdistillError
from cdistill.robust.groups import balanced_weights, train_groups

#: ``data.sampler`` values (``null``: the plain shuffle).
SAMPLERS = ("group_balanced", "class_balanced")


@dataclass(frozen=True)
class SamplePlan:
    """One epoch's draw over a split of ``N`` samples.

    Exactly one of:

    Attributes:
        weights: ``float64 [N]``: ``num_draws`` indices drawn with replacement, each with
            probability proportional to its weight.
        repeats: ``int64 [N]`` (>= 1): a shuffle of the multiset where sample ``i`` appears
            ``repeats[i]`` times (``num_draws = repeats.sum()``).
        num_draws: Indices per epoch (all ranks together).
    """

    weights: Tensor | None = None
    repeats: Tensor | None = None
    num_draws: int = 0

    def __post_init__(self) -> None:
        if (self.weights is None) == (self.repeats is None):
            raise ValueError("a SamplePlan has either weights or repeats")
        if self.num_draws < 1:
            raise ValueError("a SamplePlan draws at least one index")

    @classmethod
    def from_repeats(cls, repeats: Tensor) -> SamplePlan:
        repeats = repeats.long().cpu()
        if bool((repeats < 1).any()):
            raise ValueError("repeats must be >= 1")
        return cls(repeats=repeats, num_draws=int(repeats.sum()))

    @classmethod
    def from_weights(cls, weights: Tensor, num_draws: int) -> SamplePlan:
        return cls(weights=weights.to(torch.float64).cpu(), num_draws=int(num_draws))

    def draw(self, generator: torch.Generator) -> Tensor:
        """``int64 [num_draws]`` indices, from ``generator`` only."""
        if self.repeats is not None:
            pool = torch.repeat_interleave(torch.arange(self.repeats.numel()), self.repeats)
            return pool[torch.randperm(pool.numel(), generator=generator)]
        assert self.weights is not None
        return torch.multinomial(self.weights, self.num_draws, replacement=True, generator=generator)


def check_sampler(sampler: str | None) -> str | None:
    """Validate ``data.sampler`` (``None``/``"none"``: the plain shuffle)."""
    if sampler in (None, "", "none"):
        return None
    if sampler not in SAMPLERS:
        raise CdistillError(f"data.sampler={sampler!r}: use one of {SAMPLERS} or null (sampler=group_balanced).")
    return str(sampler)


def balanced_plan(dataset: Any, sampler: str, num_classes: int, num_bias_groups: int) -> SamplePlan:
    """``data.sampler``'s plan: as many draws per epoch as the split has samples, each group
    (``group_balanced``) or class (``class_balanced``) equally likely (Idrissi et al. 2022's
    subsampling's expectation, without throwing samples away)."""
    table = train_groups(dataset)
    by = "group" if sampler == "group_balanced" else "class"
    return SamplePlan.from_weights(balanced_weights(table, by, num_classes, num_bias_groups), len(table.labels))
