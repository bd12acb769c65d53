"""Typed settings of the group-robust baselines (reweighting, GroupDRO, JTT, DFR, LfF).

See :mod:`cdistill.objective.config_base` for the shared ``from_dict`` / ``to_dict`` contract.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from cdistill.errors import CdistillError
from cdistill.objective.config_base import PlainConfig, check_positive

#: How a group-robust task weights or balances: by ``(label, bias)`` group or by class.
BALANCE_BY = ("group", "class")


@dataclass(frozen=True)
class ReweightConfig(PlainConfig):
    """``model.reweight``: the cross-entropy of each sample weighted by ``N / (K · n_k)``, the
    inverse frequency of its group (``by=group``) or class (``by=class``) in the training split
    (``K`` keys present), so every present key carries the same total weight.

    Args:
        by: ``group`` or ``class``.
    """

    where: ClassVar[str] = "model.reweight"
    choices: ClassVar[Mapping[str, tuple[str, ...]]] = {"by": BALANCE_BY}
    by: str = BALANCE_BY[0]


@dataclass(frozen=True)
class GroupDROConfig(PlainConfig):
    """``model.group_dro``: online GroupDRO (Sagawa et al. 2020, docs/methods.md §6.3).

    Args:
        eta: Step size η of the exponentiated update of the group weights ``q``.
        adjustment: ``C`` of the group adjustment: group ``g``'s loss is raised by
            ``C / sqrt(n_g)`` in the weight update (0: off).
    """

    where: ClassVar[str] = "model.group_dro"
    eta: float = 0.01
    adjustment: float = 0.0

    def __post_init__(self) -> None:
        check_positive("model.group_dro.eta", self.eta)
        check_positive("model.group_dro.adjustment", self.adjustment, allow_zero=True)


@dataclass(frozen=True)
class JTTConfig(PlainConfig):
    """``model.jtt``: Just Train Twice (Liu et al. 2021, docs/methods.md §6.4).

    Args:
        identify_epochs: ``T``, epochs of the ERM identification model before the error set is
            taken (its training errors).
        upweight: ``λ_up``: each error appears this many times per epoch of the final model's
            training draw (every other sample once).
    """

    where: ClassVar[str] = "model.jtt"
    identify_epochs: int = 1
    upweight: int = 20

    def __post_init__(self) -> None:
        check_positive("model.jtt.identify_epochs", self.identify_epochs, integer=True)
        check_positive("model.jtt.upweight", self.upweight, integer=True)


@dataclass(frozen=True)
class DFRConfig(PlainConfig):
    """``model.dfr``: Deep Feature Reweighting (Kirichenko et al. 2022, docs/methods.md §6.5).

    Args:
        splits: The validation splits whose union is the held-out set; ``None``: the
            datamodule's held-out splits (``heldout_names``: ``val_random`` on the biased-MNIST
            families, whose cue is drawn at random, so the new head never sees the test split's
            own cue mapping) where it has them, else ``val`` ∪ ``val_reversed`` (``val`` alone
            where ``val_reversed`` is its conflicting part).
        heldout_size: At most this many held-out images (group-balanced: the same number per
            ``(label, bias)`` group of the held-out set, at most the smallest group's size);
            ``None``: as many as the smallest group allows.
        l2_grid: Candidate L2 strengths ``λ`` of the logistic regression
            (``mean CE + λ ||W||²``).
        tune_fraction: Share of each group of the held-out set used to fit while choosing ``λ``;
            the rest scores each ``λ`` by worst-group accuracy.
        num_fits: Final fits on different balanced subsets of the held-out set whose weights
            are averaged (used when the groups differ in size).
        max_iter: LBFGS iterations per fit.
    """

    where: ClassVar[str] = "model.dfr"
    splits: tuple[str, ...] | None = None
    heldout_size: int | None = None
    l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    tune_fraction: float = 0.5
    num_fits: int = 5
    max_iter: int = 100

    def __post_init__(self) -> None:
        if self.splits is not None:
            object.__setattr__(self, "splits", tuple(str(v) for v in self.splits))
            if not self.splits:
                raise CdistillError("model.dfr.splits=[]: name at least one validation split, or null for the default.")
        if self.heldout_size is not None:
            check_positive("model.dfr.heldout_size", self.heldout_size, integer=True)
        object.__setattr__(self, "l2_grid", tuple(float(v) for v in self.l2_grid))
        if not self.l2_grid or any(v < 0 for v in self.l2_grid):
            raise CdistillError(f"model.dfr.l2_grid={list(self.l2_grid)}: give at least one L2 strength >= 0.")
        if not 0.0 < float(self.tune_fraction) < 1.0:
            raise CdistillError(f"model.dfr.tune_fraction={self.tune_fraction}: use a number in (0, 1), e.g. 0.5.")
        check_positive("model.dfr.num_fits", self.num_fits, integer=True)
        check_positive("model.dfr.max_iter", self.max_iter, integer=True)


@dataclass(frozen=True)
class LfFConfig(PlainConfig):
    """``model.lff``: Learning from Failure (Nam et al. 2020, docs/methods.md §6.6).

    Args:
        q: Exponent of the biased model's generalised cross-entropy ``(1 - p_y^q) / q``.
        ema: Weight of the previous value in the per-sample exponential moving averages of both
            models' losses (``ema · old + (1 - ema) · new``).
    """

    where: ClassVar[str] = "model.lff"
    q: float = 0.7
    ema: float = 0.7

    def __post_init__(self) -> None:
        if not 0.0 < float(self.q) <= 1.0:
            raise CdistillError(f"model.lff.q={self.q}: use a number in (0, 1] (the paper's 0.7).")
        if not 0.0 <= float(self.ema) < 1.0:
            raise CdistillError(f"model.lff.ema={self.ema}: use a number in [0, 1) (the paper's 0.7).")
