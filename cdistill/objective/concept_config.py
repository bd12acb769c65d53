"""Typed settings of the concepts: the concept terms, how CAVs are fitted, and ``model.concepts``.

See :mod:`cdistill.objective.config_base` for the shared ``from_dict`` / ``to_dict`` contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cdistill.concepts.cav import DEFAULT_SOLVER, MIN_ACCURACY, SOLVER_NAMES
from cdistill.errors import CdistillError, unknown_name
from cdistill.objective.config_base import Every, build, check_choice, plain
from cdistill.objective.losses import CAV_MODES, DIRECTIONS, POSITION_WEIGHTS


@dataclass(frozen=True)
class ConceptTerm:
    """One concept term of the loss.

    Args:
        concept: Concept set; ``{y}`` picks each sample's class (``color_{y}``).
        negative: Set (or ``<name>/`` pool) the concept is separated from.
        direction: ``desensitize`` (penalise ``|cos|``) or ``sensitize``.
        weight: Weight ``w_t`` of the term.
        classes: Classes the term acts on (``None``: all).
        name: Log name (default: see :func:`term_name`).
        subspace: Penalise the component in the span of the term's CAVs instead.
        rank: With ``subspace``: the top ``rank`` singular directions (``None``: the span).
        branch: Reconstruction branch (``r`` or ``s``; intrinsic task only).
        layer: Layer of the term (intrinsic task only; the distill task has one ``layer``).
    """

    concept: str
    negative: str = "random"
    direction: str = "desensitize"
    weight: float = 1.0
    classes: tuple[int, ...] | None = None
    name: str | None = None
    subspace: bool = False
    rank: int | None = None
    branch: str | None = None
    layer: str | None = None

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise CdistillError(f"Concept term {self.to_dict()}: direction must be one of {DIRECTIONS}.")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise CdistillError(f"Concept term {self.to_dict()}: rank must be a whole number >= 1 (or null: the whole span).")

    @classmethod
    def from_dict(cls, term: Mapping[str, Any], required: tuple[str, ...] = ("concept",)) -> ConceptTerm:
        missing = [k for k in required if k not in term]
        if missing:
            raise CdistillError(f"Concept term {dict(term)} lacks {missing}: give {', '.join(required)}.")
        values = {k: v for k, v in term.items() if v is not None}
        if "classes" in values:
            values["classes"] = tuple(int(k) for k in values["classes"])
        for key in ("concept", "negative", "layer", "branch", "name"):
            if key in values:
                values[key] = str(values[key])
        return build(cls, values, "a concept term")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = plain(dataclasses.asdict(self))
        return out


def term_name(term: ConceptTerm | Mapping[str, Any]) -> str:
    """Log name of a concept term: its ``name``, else ``<branch>_<concept>`` (a branch term),
    else ``concept``; ``{y}`` reads ``y`` (``color_{y}`` -> ``color_y``)."""
    t = term if isinstance(term, ConceptTerm) else ConceptTerm.from_dict(term)
    raw = t.name or (f"{t.branch}_{t.concept}" if t.branch else t.concept)
    return raw.replace("{y}", "y")


@dataclass(frozen=True)
class CAVConfig:
    """How CAVs are fitted, trusted and refreshed (YAML: the keys of ``model.concepts``).

    Args:
        solver: One of :data:`cdistill.concepts.cav.SOLVER_NAMES`.
        min_accuracy: Held-out accuracy gate; a CAV below it is skipped (warned).
        test_fraction: Share of each set held out for that accuracy.
        refresh: Refit schedule during training (``refresh_every_n_steps`` /
            ``refresh_every_n_epochs``; ``refit_...`` reads the same). Never: fitted once.
        ema: Weight of a refreshed CAV in the running one (1: replaced).
        cav_mode: ``flatten`` (one CAV on the flattened map) or ``position`` (channel space).
        position_threshold: Position mode: content positions differ from a blank image's by
            more than this times the maximum.
        max_rows: Position mode: at most this many rows per set (seeded subset; ``None``: all).
        position_weight: Position mode: ``norm`` (gradient-norm weights) or ``uniform``.
    """

    solver: str = DEFAULT_SOLVER
    min_accuracy: float = MIN_ACCURACY
    test_fraction: float = 0.3
    refresh: Every = field(default_factory=Every)
    ema: float = 0.3
    cav_mode: str = "flatten"
    position_threshold: float = 0.1
    max_rows: int | None = 20000
    position_weight: str = "norm"

    def __post_init__(self) -> None:
        if self.solver not in SOLVER_NAMES:
            raise unknown_name("CAV solver", self.solver, SOLVER_NAMES, "Set model.concepts.solver to one of these.")
        check_choice("model.concepts.cav_mode", self.cav_mode, CAV_MODES)
        check_choice("model.concepts.position_weight", self.position_weight, POSITION_WEIGHTS)
        if not 0.0 < self.test_fraction < 1.0:
            raise CdistillError(f"model.concepts.test_fraction={self.test_fraction}: use a fraction in (0, 1).")
        if not 0.0 <= self.ema <= 1.0:
            raise CdistillError(f"model.concepts.ema={self.ema}: use a weight in [0, 1] (1: replace on refresh).")


#: The intrinsic task's CAVs: difference vectors separate well by their means, and a refit
#: replaces the CAVs (they follow a net trained from scratch).
IID_CAV = CAVConfig(solver="mean_diff", ema=1.0)
_CAV_KEYS = tuple(f.name for f in dataclasses.fields(CAVConfig) if f.name != "refresh")


@dataclass(frozen=True)
class ConceptsConfig:
    """``model.concepts``: the concept spec, the terms and the CAV settings.

    Args:
        spec: Concept-set YAML (distill task; ``None`` for the intrinsic task's pairs).
        terms: The concept terms.
        cav: CAV settings.
        num_pairs: Intrinsic task: concept pairs per set (0: the datamodule's).
    """

    spec: str | None = None
    terms: tuple[ConceptTerm, ...] = ()
    cav: CAVConfig = field(default_factory=CAVConfig)
    num_pairs: int = 0

    @classmethod
    def from_dict(
        cls, cfg: Mapping[Any, Any] | None, base: CAVConfig | None = None, required: tuple[str, ...] = ("concept",)
    ) -> ConceptsConfig:
        """Parse the flat YAML form; CAV keys not given take ``base``'s values (default: :class:`CAVConfig`'s)."""
        rest = {str(k): v for k, v in (cfg or {}).items() if v is not None}  # null: the default
        refresh = Every.pop(rest, "refresh", "refit")
        cav: dict[str, Any] = {k: rest.pop(k) for k in _CAV_KEYS if k in rest}
        if refresh.active:
            cav["refresh"] = refresh
        terms = tuple(ConceptTerm.from_dict(t, required) for t in rest.pop("terms", None) or ())
        keys = ("spec", "terms", "num_pairs", *_CAV_KEYS, *Every().to_keys("refresh"), *Every().to_keys("refit"))
        for key in rest:
            if key not in ("spec", "num_pairs"):
                raise unknown_name("key of model.concepts", str(key), keys, f"Remove model.concepts.{key} or fix its name.")
        cav_cfg = dataclasses.replace(base or CAVConfig(), **cav)
        return build(cls, {**rest, "terms": terms, "cav": cav_cfg}, "model.concepts")

    def to_dict(self) -> dict[str, Any]:
        cav = {k: getattr(self.cav, k) for k in _CAV_KEYS}
        return {"spec": self.spec, "terms": [t.to_dict() for t in self.terms], **cav,
                **self.cav.refresh.to_keys("refresh"), "num_pairs": self.num_pairs}
