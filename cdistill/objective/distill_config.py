"""The settings of the concept-distillation task: the loss and everything the task is built
from, in one :class:`DistillConfig`.

:class:`DistillConfig` is read from the task's keyword arguments (:meth:`DistillConfig.from_kwargs`),
checks the settings against each other (a weight with nothing to act on, RR-ClArC without a
desensitize term, a teacher with refreshed CAVs) and is written back with
:meth:`DistillConfig.to_dict` as the plain ``hparams`` of the task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cdistill.errors import CdistillError
from cdistill.objective import term_config as terms
from cdistill.objective.concept_config import ConceptsConfig
from cdistill.objective.config_base import PlainConfig, build, plain, without_nulls
from cdistill.objective.losses import LOGIT_TARGETS
from cdistill.teacher.config import TeacherConfig

#: The forms of the concept loss: ``prototype`` (``|cos(a - Pbar_y, v)|``) or ``logit`` (``∇_a`` of a logit target).
FORMS = ("prototype", "logit")
#: The loss weights, in the order of the objective's terms.
WEIGHTS = ("lambda_c", "lambda_p", "lambda_l", "lambda_o", "lambda_s", "lambda_rr", "lambda_adv")
#: The weights of the terms that act on the concepts (each needs at least one concept term).
CONCEPT_WEIGHTS = ("lambda_c", "lambda_o", "lambda_s", "lambda_rr", "lambda_adv")


#: The sub-configs of :class:`DistillConfig` read with their own ``from_dict``.
_PARTS: dict[str, Any] = {
    "concepts": ConceptsConfig, "prototypes": terms.PrototypeConfig, "local": terms.LocalConfig,
    "erasure": terms.ErasureConfig, "outputs": terms.OutputConfig, "counterfactual": terms.CounterfactualConfig,
    "rrclarc": terms.RRClArCConfig, "probe": terms.ProbeConfig,
}


@dataclass(frozen=True)
class DistillConfig(PlainConfig):
    """Everything :class:`~cdistill.tasks.distill.ConceptDistillModule` is built from, but its
    layer (resolved on the student) and the classifier's own arguments: the loss (its form, the
    logit target, the weight of each term, 0 switching a term off) and each term's settings.

    Args:
        lambda_c: The gradient-direction concept loss ``L_c`` (docs/methods.md §2.4).
        form: ``L_c``'s form: ``prototype`` (``|cos(a - Pbar_y, v)|``, no double backward) or
            ``logit`` (``∇_a`` of the ``target``, by one batched double backward).
        target: Scalar the logit form differentiates (:data:`~cdistill.objective.losses.LOGIT_TARGETS`;
            ``random``: the logit of a class drawn per sample).
        concepts: ``model.concepts``: the concept spec, the terms and the CAV settings, which
            every concept term uses.
        lambda_p, prototypes: The prototype loss ``L_p`` and the class prototypes.
        lambda_l, local: The local input-gradient loss and its mask.
        lambda_o, lambda_s, outputs, counterfactual: The concept-only predictions
            (docs/methods.md §2.8) and the latent counterfactuals (§2.9), both drawing concept
            images as ``outputs`` says; the counterfactuals' layers.
        lambda_rr, rrclarc: RR-ClArC, the squared output gradient along the signal CAVs (§2.11).
        lambda_adv, probe: The student's side of the adversarial concept probe (§2.12).
        erasure: ``model.erasure`` (``None``: no erasure).
        teacher: ``model.teacher`` (``None``: CAVs fitted on the student's own activations):
            CAVs fitted on the teacher's features of the concept images mapped into the
            student's layer space, once, before training.
        fit_batch_size: Batch size for computing activations when fitting artefacts.
    """

    where: ClassVar[str] = "model"
    choices: ClassVar[Mapping[str, tuple[str, ...]]] = {"form": FORMS, "target": LOGIT_TARGETS}
    lambda_c: float = 1.0
    form: str = FORMS[0]
    target: str = LOGIT_TARGETS[0]
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)
    lambda_p: float = 0.0
    prototypes: terms.PrototypeConfig = field(default_factory=terms.PrototypeConfig)
    lambda_l: float = 0.0
    local: terms.LocalConfig = field(default_factory=terms.LocalConfig)
    lambda_o: float = 0.0
    lambda_s: float = 0.0
    outputs: terms.OutputConfig = field(default_factory=terms.OutputConfig)
    counterfactual: terms.CounterfactualConfig = field(default_factory=terms.CounterfactualConfig)
    lambda_rr: float = 0.0
    rrclarc: terms.RRClArCConfig = field(default_factory=terms.RRClArCConfig)
    lambda_adv: float = 0.0
    probe: terms.ProbeConfig = field(default_factory=terms.ProbeConfig)
    erasure: terms.ErasureConfig | None = None
    teacher: TeacherConfig | None = None
    fit_batch_size: int = 500

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in WEIGHTS:
            value = getattr(self, key)
            if not value >= 0:  # also NaN; a negative weight would switch the term off unnoticed
                raise CdistillError(f"model.{key}={value}: a loss weight must be >= 0 (0 switches the term off).")
        concept_terms = self.concepts.terms
        for key in CONCEPT_WEIGHTS:
            if self.on(key) and not concept_terms:
                raise CdistillError(f"model.{key} > 0 but model.concepts.terms is empty: name at least one concept.")
        if self.on("lambda_rr") and all(t.direction == "sensitize" for t in concept_terms):
            raise CdistillError("model.lambda_rr > 0 but every concept term is sensitize: RR-ClArC only "
                                "desensitizes (use model.lambda_c for sensitize terms).")
        if self.teacher is not None and self.concepts.cav.refresh.active:
            raise CdistillError("Teacher-space CAVs are fitted once, before training: set "
                                "model.concepts.refresh_every_n_steps=0 (or model.teacher=null).")

    def on(self, key: str) -> bool:
        """Whether the term of weight ``key`` (e.g. ``lambda_c``) is on."""
        return bool(getattr(self, key) > 0)

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any] | None) -> DistillConfig:
        """Parse the task's settings (plain values or OmegaConf nodes; a null: the default)."""
        values = {k: plain(v) for k, v in (cfg or {}).items()}
        parts = {k: part.from_dict(values.pop(k, None)) for k, part in _PARTS.items()}
        teacher = values.pop("teacher", None)
        parts["teacher"] = TeacherConfig.from_dict(teacher) if teacher else None
        return build(cls, {**without_nulls(values), **parts}, cls.where)

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> tuple[DistillConfig, dict[str, Any]]:
        """Split a task's keyword arguments into this config (its fields' keys) and the rest."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls.from_dict({k: v for k, v in kwargs.items() if k in names}), \
            {k: v for k, v in kwargs.items() if k not in names}

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the task's ``hparams``): ``from_dict(to_dict(c)) == c``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if hasattr(value, "to_dict") else plain(value)
        return out


#: The name the loss's settings had when they only held the form, the target and the weights.
ObjectiveConfig = DistillConfig
