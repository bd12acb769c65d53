"""Typed settings of the concept objective: one home for every default.

The tasks take plain dicts (Hydra config, Lightning ``hparams``, checkpoints loaded with
``weights_only=True``) and turn them into the frozen dataclasses here with ``from_dict``; each
class validates itself in ``__post_init__`` (a :class:`~cdistill.errors.CdistillError` that
names the key and the fix) and writes itself back with ``to_dict``, in the YAML's own keys, so
``from_dict(to_dict(c)) == c``. A default lives in exactly one place: the field of its class
(or, for a task whose default differs, one named override such as :data:`IID_CAV`).

Schedules (CAV refresh, eraser refit, prototype refresh) are one :class:`Every`; the YAML keys
``<what>_every_n_steps`` / ``<what>_every_n_epochs`` stay the way to set it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cdistill.concepts.cav import DEFAULT_SOLVER, MIN_ACCURACY, SOLVER_NAMES
from cdistill.erasure.hooks import ErasureSpec, specs_from_config
from cdistill.errors import CdistillError, unknown_name
from cdistill.objective.concept_outputs import OUTPUT_REDUCTIONS, OUTPUT_TARGETS
from cdistill.objective.counterfactual import ShiftLayer
from cdistill.objective.losses import CAV_MODES, DIRECTIONS, LOGIT_TARGETS, POSITION_WEIGHTS
from cdistill.objective.rrclarc import RR_TARGETS

LOCAL_MASKS = ("foreground", "corners")

C = TypeVar("C")


def _build(cls: type[C], values: Mapping[str, Any], where: str) -> C:
    """``cls(**values)``, with an unknown key named (and close names listed) instead of a TypeError."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in values:
        if key not in names:
            raise unknown_name(f"key of {where}", str(key), names, f"Remove {where}.{key} or fix its name.")
    return cls(**values)


def _check_choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise CdistillError(f"{where}={value!r}: use one of {choices}.")


@dataclass(frozen=True)
class Every:
    """A schedule: every ``steps`` optimiser steps and/or every ``epochs`` epochs (0: never).

    Args:
        steps: Due after global step ``n · steps`` (``n >= 1``).
        epochs: Due at epoch ``n · epochs`` (``n >= 1``; the caller says whether at its start
            or after its last batch).
    """

    steps: int = 0
    epochs: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "epochs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CdistillError(f"A schedule's every_n_{key}={value!r}: use a whole number >= 0 (0: never).")

    @property
    def active(self) -> bool:
        return self.steps > 0 or self.epochs > 0

    def step_due(self, step: int) -> bool:
        """Due after global step ``step`` (never at step 0)."""
        return self.steps > 0 and step > 0 and step % self.steps == 0

    def epoch_due(self, epoch: int) -> bool:
        """Due at epoch ``epoch`` (never at epoch 0)."""
        return self.epochs > 0 and epoch > 0 and epoch % self.epochs == 0

    @classmethod
    def pop(cls, cfg: dict[str, Any], *prefixes: str) -> Every:
        """Take ``<prefix>_every_n_steps`` / ``<prefix>_every_n_epochs`` (the first prefix
        that has a key wins; absent or null: 0) out of ``cfg``; every prefix's keys are removed."""
        found: dict[str, int] = {}
        for prefix in prefixes:
            for unit in ("steps", "epochs"):
                value = cfg.pop(f"{prefix}_every_n_{unit}", None)
                if value is not None and unit not in found:
                    found[unit] = int(value)
        return cls(**found)

    def to_keys(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}_every_n_steps": self.steps, f"{prefix}_every_n_epochs": self.epochs}


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
        return _build(cls, values, "a concept term")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["classes"] = None if self.classes is None else list(self.classes)
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
        _check_choice("model.concepts.cav_mode", self.cav_mode, CAV_MODES)
        _check_choice("model.concepts.position_weight", self.position_weight, POSITION_WEIGHTS)
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
        return _build(cls, {**rest, "terms": terms, "cav": cav_cfg}, "model.concepts")

    def to_dict(self) -> dict[str, Any]:
        cav = {k: getattr(self.cav, k) for k in _CAV_KEYS}
        return {"spec": self.spec, "terms": [t.to_dict() for t in self.terms], **cav,
                **self.cav.refresh.to_keys("refresh"), "num_pairs": self.num_pairs}


@dataclass(frozen=True)
class PrototypeConfig:
    """``model.prototypes``: ``k`` centres per class (1: class mean), a ``refresh`` schedule
    (``refresh_every_n_epochs``; at the start of the due epoch) and the ``ema`` weight of fresh centres."""

    k: int = 1
    refresh: Every = field(default_factory=Every)
    ema: float = 0.3

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise CdistillError(f"model.prototypes.k={self.k!r}: use a whole number >= 1.")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> PrototypeConfig:
        rest = {k: v for k, v in (cfg or {}).items() if v is not None}
        refresh = Every.pop(rest, "refresh")
        if "k" in rest:
            rest["k"] = int(rest["k"])
        return _build(cls, {**rest, "refresh": refresh}, "model.prototypes")

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, **self.refresh.to_keys("refresh"), "ema": self.ema}


@dataclass(frozen=True)
class LocalConfig:
    """``model.local``: the ``mask`` of the local input-gradient loss (``foreground``: a
    ``fraction`` of the pixels brighter than ``threshold``; ``corners``: ``size``-pixel patches)."""

    mask: str = "foreground"
    threshold: float = 0.1
    fraction: float = 0.5
    size: int = 5

    def __post_init__(self) -> None:
        if self.mask not in LOCAL_MASKS:
            raise CdistillError(f"model.local.mask={self.mask!r}: use foreground or corners.")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> LocalConfig:
        return _build(cls, {k: v for k, v in (cfg or {}).items() if v is not None}, "model.local")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ObjectiveConfig:
    """The loss of the distill task: its ``form`` (``prototype`` or ``logit``), the logit
    ``target`` (:data:`LOGIT_TARGETS`) and the weights of the concept, prototype, local,
    concept-image (``λ_o``, ``λ_s``), RR-ClArC (``λ_rr``) and adversarial-probe (``λ_adv``) terms."""

    form: str = "prototype"
    target: str = "logprob"
    lambda_c: float = 1.0
    lambda_p: float = 0.0
    lambda_l: float = 0.0
    lambda_o: float = 0.0
    lambda_s: float = 0.0
    lambda_rr: float = 0.0
    lambda_adv: float = 0.0

    def __post_init__(self) -> None:
        _check_choice("model.form", self.form, ("prototype", "logit"))
        _check_choice("model.target", self.target, LOGIT_TARGETS)
        for key in ("lambda_c", "lambda_p", "lambda_l", "lambda_o", "lambda_s", "lambda_rr", "lambda_adv"):
            value = getattr(self, key)
            if not value >= 0:  # also NaN; a negative weight would switch the term off unnoticed
                raise CdistillError(f"model.{key}={value}: a loss weight must be >= 0 (0 switches the term off).")


@dataclass(frozen=True)
class OutputConfig:
    """``model.outputs``: the concept-image terms' sampling and the output term's target
    (docs/methods.md §2.8).

    Args:
        target: What a desensitized concept's images are predicted as (:data:`OUTPUT_TARGETS`).
        per_set: Images drawn per concept set per training step.
        reduce: ``set`` (each cue value's mean prediction) or ``image`` (each concept image's
            prediction) is pulled to the target (:data:`OUTPUT_REDUCTIONS`). ``set`` is the
            default: it is right also when concept images show more than the cue, and it closed
            more of the gap on every family on seed 0 (``benchmarks/results/generality.md``).
    """

    target: str = "uniform"
    per_set: int = 8
    reduce: str = "set"

    def __post_init__(self) -> None:
        _check_choice("model.outputs.target", self.target, OUTPUT_TARGETS)
        _check_choice("model.outputs.reduce", self.reduce, OUTPUT_REDUCTIONS)
        if isinstance(self.per_set, bool) or not isinstance(self.per_set, int) or self.per_set < 1:
            raise CdistillError(f"model.outputs.per_set={self.per_set!r}: use a whole number >= 1.")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> OutputConfig:
        rest = {k: v for k, v in (cfg or {}).items() if v is not None}
        return _build(cls, rest, "model.outputs")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RRClArCConfig:
    """``model.rrclarc``: which output the RR-ClArC term differentiates (docs/methods.md §2.11).

    Args:
        target: ``random``: the logit ``z_k`` of a class ``k`` drawn per sample, against the
            signal CAV of the cue that points to ``k`` (every class's sensitivity to its own cue
            is penalised, in expectation); ``logit``: the logit ``z_y`` of the sample's class,
            against the CAV of ``y``'s cue (the paper's class-specific mask ``m = δ_y``).
    """

    target: str = "random"

    def __post_init__(self) -> None:
        _check_choice("model.rrclarc.target", self.target, RR_TARGETS)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> RRClArCConfig:
        return _build(cls, {k: v for k, v in (cfg or {}).items() if v is not None}, "model.rrclarc")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ProbeConfig:
    """``model.probe``: the adversarial concept probe (docs/methods.md §2.12).

    Args:
        per_set: Concept images drawn per cue value per training step.
        lr: The probe's learning rate (``None``: the optimizer's).
        warm_steps: Full-batch steps that fit the probe on the starting model's activations of
            all concept images before training (0: it starts at zero weights, i.e. uniform).
        warm_lr: Adam learning rate of those steps.
        smoothing: Label smoothing of the probe's cross-entropy: it keeps the probe calibrated
            (a linear probe on separable features otherwise grows its weights without bound), so
            the student's ``KL(u || p)`` starts near ``log`` of a bounded odds, not at tens of nats.
    """

    per_set: int = 8
    lr: float | None = None
    warm_steps: int = 200
    warm_lr: float = 0.01
    smoothing: float = 0.1

    def __post_init__(self) -> None:
        for key in ("per_set", "warm_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "per_set" else 0):
                raise CdistillError(f"model.probe.{key}={value!r}: use a whole number >= {int(key == 'per_set')}.")
        for key in ("lr", "warm_lr"):
            value = getattr(self, key)
            if value is not None and not float(value) > 0:
                raise CdistillError(f"model.probe.{key}={value}: a learning rate must be > 0.")
        if not 0.0 <= self.smoothing < 1.0:
            raise CdistillError(f"model.probe.smoothing={self.smoothing}: use a fraction in [0, 1).")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> ProbeConfig:
        rest = {k: v for k, v in (cfg or {}).items() if v is not None}
        for key in ("lr", "warm_lr", "smoothing"):
            if key in rest:
                rest[key] = float(rest[key])
        return _build(cls, rest, "model.probe")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CounterfactualConfig:
    """``model.counterfactual``: the layers of the latent-counterfactual term (docs/methods.md
    §2.9), each ``<module path>`` (flatten mode) or ``<module path>:<mode>`` (a
    :data:`~cdistill.objective.counterfactual.SHIFT_MODES` entry). ``None``: the
    default, the pixels per position and ``model.layer`` flattened (:meth:`layers_for`)."""

    layers: tuple[str, ...] | None = None

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> CounterfactualConfig:
        rest = {k: v for k, v in (cfg or {}).items() if v is not None}
        if "layers" in rest:
            layers = rest["layers"]
            rest["layers"] = tuple(str(x) for x in ([layers] if isinstance(layers, str) else layers))
        out = _build(cls, rest, "model.counterfactual")
        for text in out.layers or ():
            ShiftLayer.parse(text)
        return out

    def layers_for(self, layer: str) -> list[ShiftLayer]:
        """The parsed layers, ``layer`` being the task's ``model.layer``."""
        texts = self.layers if self.layers is not None else ("input:position", layer)
        return [ShiftLayer.parse(t) for t in dict.fromkeys(texts)]

    def to_dict(self) -> dict[str, Any]:
        return {"layers": None if self.layers is None else list(self.layers)}


@dataclass(frozen=True)
class ErasureConfig:
    """``model.erasure``: one :class:`~cdistill.erasure.hooks.ErasureSpec` per layer and the
    ``refit`` schedule (``refit_every_n_steps``; ``refit_every_n_epochs``: after the last batch
    of the due epoch). Never: the erasers are fitted once, on the model training starts from."""

    specs: tuple[ErasureSpec, ...]
    refit: Every = field(default_factory=Every)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> ErasureConfig | None:
        """``None`` (or an empty dict): no erasure."""
        if not cfg:
            return None
        rest = dict(cfg)
        refit = Every.pop(rest, "refit")
        return cls(specs=tuple(specs_from_config(rest)), refit=refit)

    def to_dict(self) -> dict[str, Any]:
        first = self.specs[0]
        common = {k: getattr(first, k) for k in ("mode", "method", "concept", "positive", "rows_per_sample")}
        return {"layers": [s.layer for s in self.specs], **common, "options": dict(first.options),
                **self.refit.to_keys("refit")}


# --------------------------------------------------------------------------- group-robust methods
#: How a group-robust task weights or balances: by ``(label, bias)`` group or by class.
BALANCE_BY = ("group", "class")


def _plain(cls: type[C], cfg: Mapping[str, Any] | None, where: str) -> C:
    """``cls`` from a config dict whose ``null`` values mean the field's default."""
    return _build(cls, {k: v for k, v in (cfg or {}).items() if v is not None}, where)


def _check_positive(where: str, value: Any, integer: bool = False, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not (value >= 0 if allow_zero else value > 0):
        kind = "a whole number" if integer else "a number"
        raise CdistillError(f"{where}={value!r}: use {kind} {'>= 0' if allow_zero else '> 0'}.")


@dataclass(frozen=True)
class ReweightConfig:
    """``model.reweight``: the cross-entropy of each sample weighted by ``N / (K · n_k)``, the
    inverse frequency of its group (``by=group``) or class (``by=class``) in the training split
    (``K`` keys present), so every present key carries the same total weight.

    Args:
        by: ``group`` or ``class``.
    """

    by: str = "group"

    def __post_init__(self) -> None:
        _check_choice("model.reweight.by", self.by, BALANCE_BY)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> ReweightConfig:
        return _plain(cls, cfg, "model.reweight")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GroupDROConfig:
    """``model.group_dro``: online GroupDRO (Sagawa et al. 2020, docs/methods.md §6.3).

    Args:
        eta: Step size η of the exponentiated update of the group weights ``q``.
        adjustment: ``C`` of the group adjustment: group ``g``'s loss is raised by
            ``C / sqrt(n_g)`` in the weight update (0: off).
    """

    eta: float = 0.01
    adjustment: float = 0.0

    def __post_init__(self) -> None:
        _check_positive("model.group_dro.eta", self.eta)
        _check_positive("model.group_dro.adjustment", self.adjustment, allow_zero=True)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> GroupDROConfig:
        return _plain(cls, cfg, "model.group_dro")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class JTTConfig:
    """``model.jtt``: Just Train Twice (Liu et al. 2021, docs/methods.md §6.4).

    Args:
        identify_epochs: ``T``, epochs of the ERM identification model before the error set is
            taken (its training errors).
        upweight: ``λ_up``: each error appears this many times per epoch of the final model's
            training draw (every other sample once).
    """

    identify_epochs: int = 1
    upweight: int = 20

    def __post_init__(self) -> None:
        _check_positive("model.jtt.identify_epochs", self.identify_epochs, integer=True)
        _check_positive("model.jtt.upweight", self.upweight, integer=True)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> JTTConfig:
        return _plain(cls, cfg, "model.jtt")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DFRConfig:
    """``model.dfr``: Deep Feature Reweighting (Kirichenko et al. 2022, docs/methods.md §6.5).

    Args:
        heldout_size: At most this many held-out images (group-balanced: the same number per
            ``(label, bias)`` group of ``val`` ∪ ``val_reversed``, at most the smallest group's
            size); ``None``: as many as the smallest group allows.
        l2_grid: Candidate L2 strengths ``λ`` of the logistic regression
            (``mean CE + λ ||W||²``).
        tune_fraction: Share of each group of the held-out set used to fit while choosing ``λ``;
            the rest scores each ``λ`` by worst-group accuracy.
        num_fits: Final fits on different balanced subsets of the held-out set whose weights
            are averaged (used when the groups differ in size).
        max_iter: LBFGS iterations per fit.
    """

    heldout_size: int | None = None
    l2_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
    tune_fraction: float = 0.5
    num_fits: int = 5
    max_iter: int = 100

    def __post_init__(self) -> None:
        if self.heldout_size is not None:
            _check_positive("model.dfr.heldout_size", self.heldout_size, integer=True)
        object.__setattr__(self, "l2_grid", tuple(float(v) for v in self.l2_grid))
        if not self.l2_grid or any(v < 0 for v in self.l2_grid):
            raise CdistillError(f"model.dfr.l2_grid={list(self.l2_grid)}: give at least one L2 strength >= 0.")
        if not 0.0 < float(self.tune_fraction) < 1.0:
            raise CdistillError(f"model.dfr.tune_fraction={self.tune_fraction}: use a number in (0, 1), e.g. 0.5.")
        _check_positive("model.dfr.num_fits", self.num_fits, integer=True)
        _check_positive("model.dfr.max_iter", self.max_iter, integer=True)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> DFRConfig:
        return _plain(cls, cfg, "model.dfr")

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["l2_grid"] = list(self.l2_grid)
        return out


@dataclass(frozen=True)
class LfFConfig:
    """``model.lff``: Learning from Failure (Nam et al. 2020, docs/methods.md §6.6).

    Args:
        q: Exponent of the biased model's generalised cross-entropy ``(1 - p_y^q) / q``.
        ema: Weight of the previous value in the per-sample exponential moving averages of both
            models' losses (``ema · old + (1 - ema) · new``).
    """

    q: float = 0.7
    ema: float = 0.7

    def __post_init__(self) -> None:
        if not 0.0 < float(self.q) <= 1.0:
            raise CdistillError(f"model.lff.q={self.q}: use a number in (0, 1] (the paper's 0.7).")
        if not 0.0 <= float(self.ema) < 1.0:
            raise CdistillError(f"model.lff.ema={self.ema}: use a number in [0, 1) (the paper's 0.7).")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> LfFConfig:
        return _plain(cls, cfg, "model.lff")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
