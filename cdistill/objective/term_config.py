"""Typed settings of the distill task's loss terms and artefacts besides the concepts:
prototypes, the local mask, the concept-image terms, RR-ClArC, the adversarial probe and erasure.

See :mod:`cdistill.objective.config_base` for the shared ``from_dict`` / ``to_dict`` contract.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cdistill.erasure.hooks import ErasureSpec, specs_from_config
from cdistill.errors import CdistillError
from cdistill.objective.concept_outputs import OUTPUT_REDUCTIONS, OUTPUT_TARGETS
from cdistill.objective.config_base import Every, PlainConfig
from cdistill.objective.counterfactual import ShiftLayer
from cdistill.objective.rrclarc import RR_TARGETS

LOCAL_MASKS = ("foreground", "corners")


def _check_count(where: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise CdistillError(f"{where}={value!r}: use a whole number >= {least}.")


@dataclass(frozen=True)
class PrototypeConfig(PlainConfig):
    """``model.prototypes``: ``k`` centres per class (1: class mean), a ``refresh`` schedule
    (``refresh_every_n_epochs``; at the start of the due epoch) and the ``ema`` weight of fresh centres."""

    where: ClassVar[str] = "model.prototypes"
    k: int = 1
    refresh: Every = field(default_factory=Every)
    ema: float = 0.3

    def __post_init__(self) -> None:
        _check_count("model.prototypes.k", self.k, 1)

    @classmethod
    def _prepare(cls, values: dict[str, Any]) -> dict[str, Any]:
        refresh = Every.pop(values, "refresh")
        if "k" in values:
            values["k"] = int(values["k"])
        return {**values, "refresh": refresh}

    def to_dict(self) -> dict[str, Any]:
        return {"k": self.k, **self.refresh.to_keys("refresh"), "ema": self.ema}


@dataclass(frozen=True)
class LocalConfig(PlainConfig):
    """``model.local``: the ``mask`` of the local input-gradient loss (``foreground``: a
    ``fraction`` of the pixels brighter than ``threshold``; ``corners``: ``size``-pixel patches)."""

    where: ClassVar[str] = "model.local"
    choices: ClassVar[Mapping[str, tuple[str, ...]]] = {"mask": LOCAL_MASKS}
    mask: str = LOCAL_MASKS[0]
    threshold: float = 0.1
    fraction: float = 0.5
    size: int = 5


@dataclass(frozen=True)
class OutputConfig(PlainConfig):
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

    where: ClassVar[str] = "model.outputs"
    choices: ClassVar[Mapping[str, tuple[str, ...]]] = {"target": OUTPUT_TARGETS, "reduce": OUTPUT_REDUCTIONS}
    target: str = "uniform"
    per_set: int = 8
    reduce: str = "set"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_count("model.outputs.per_set", self.per_set, 1)


@dataclass(frozen=True)
class RRClArCConfig(PlainConfig):
    """``model.rrclarc``: which output the RR-ClArC term differentiates (docs/methods.md §2.11).

    Args:
        target: ``random``: the logit ``z_k`` of a class ``k`` drawn per sample, against the
            signal CAV of the cue that points to ``k`` (every class's sensitivity to its own cue
            is penalised, in expectation); ``logit``: the logit ``z_y`` of the sample's class,
            against the CAV of ``y``'s cue (the paper's class-specific mask ``m = δ_y``).
    """

    where: ClassVar[str] = "model.rrclarc"
    choices: ClassVar[Mapping[str, tuple[str, ...]]] = {"target": RR_TARGETS}
    target: str = "random"


@dataclass(frozen=True)
class ProbeConfig(PlainConfig):
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

    where: ClassVar[str] = "model.probe"
    per_set: int = 8
    lr: float | None = None
    warm_steps: int = 200
    warm_lr: float = 0.01
    smoothing: float = 0.1

    def __post_init__(self) -> None:
        _check_count("model.probe.per_set", self.per_set, 1)
        _check_count("model.probe.warm_steps", self.warm_steps, 0)
        for key in ("lr", "warm_lr"):
            value = getattr(self, key)
            if value is not None and not float(value) > 0:
                raise CdistillError(f"model.probe.{key}={value}: a learning rate must be > 0.")
        if not 0.0 <= self.smoothing < 1.0:
            raise CdistillError(f"model.probe.smoothing={self.smoothing}: use a fraction in [0, 1).")

    @classmethod
    def _prepare(cls, values: dict[str, Any]) -> dict[str, Any]:
        return {k: float(v) if k in ("lr", "warm_lr", "smoothing") else v for k, v in values.items()}


@dataclass(frozen=True)
class CounterfactualConfig(PlainConfig):
    """``model.counterfactual``: the layers of the latent-counterfactual term (docs/methods.md
    §2.9), each ``<module path>`` (flatten mode) or ``<module path>:<mode>`` (a
    :data:`~cdistill.objective.counterfactual.SHIFT_MODES` entry). ``None``: the
    default, the pixels per position and ``model.layer`` flattened (:meth:`layers_for`)."""

    where: ClassVar[str] = "model.counterfactual"
    layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for text in self.layers or ():
            ShiftLayer.parse(text)

    @classmethod
    def _prepare(cls, values: dict[str, Any]) -> dict[str, Any]:
        if "layers" in values:
            layers = values["layers"]
            values["layers"] = tuple(str(x) for x in ([layers] if isinstance(layers, str) else layers))
        return values

    def layers_for(self, layer: str) -> list[ShiftLayer]:
        """The parsed layers, ``layer`` being the task's ``model.layer``."""
        texts = self.layers if self.layers is not None else ("input:position", layer)
        return [ShiftLayer.parse(t) for t in dict.fromkeys(texts)]


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
