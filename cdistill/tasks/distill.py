"""ConceptDistillModule: task loss + concept loss + prototype loss + local loss.

``L = L_task + λ_c Σ_t w_t L_c,t + λ_p L_p + λ_L L_local + λ_o L_out + λ_s L_cf + λ_rr L_RR + λ_adv L_adv``
(docs/methods.md §2.7; the concept-image terms ``L_out`` and ``L_cf``: §2.8-2.9,
:mod:`cdistill.objective.concept_images`; RR-ClArC ``L_RR``: §2.11, :mod:`cdistill.objective.rrclarc`;
the adversarial probe ``L_adv``: §2.12, :mod:`cdistill.objective.adversarial_probe`, whose own
cross-entropy is added with weight 1 and trains only the probe); a term is computed only when
its λ is > 0, and every term is logged (``train/task``, ``train/concept``,
``train/concept/<term>``, ``train/prototype``, ``train/local``, ``train/rrclarc``,
``train/rrclarc/<term>``, ``train/probe``, ``train/probe_fit``, ``train/probe_acc``).

This module holds the Lightning hooks and the loss. The concept artefacts (CAVs, prototypes,
erasers) are fitted by :class:`~cdistill.tasks.concept_artefacts.ConceptArtefactsMixin` with a
:class:`~cdistill.objective.cav_fitter.CAVFitter`, the erasers applied and probed by
:class:`~cdistill.tasks.erasing.ErasureMixin`; the settings are the typed configs of
:mod:`cdistill.objective.config`, where every default lives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdistill.concepts.cav import CAVBank
from cdistill.erasure import LowRankEraser
from cdistill.erasure.hooks import eraser_key
from cdistill.errors import CdistillError
from cdistill.models.layers import resolve_layer
from cdistill.objective.adversarial_probe import ConceptProbe
from cdistill.objective.cav_fitter import CAVFitter
from cdistill.objective.concept_images import INPUT, ConceptImageTerms, load_image_sets
from cdistill.objective.config import (
    ConceptsConfig,
    CounterfactualConfig,
    ErasureConfig,
    LocalConfig,
    ObjectiveConfig,
    OutputConfig,
    ProbeConfig,
    PrototypeConfig,
    RRClArCConfig,
    term_name,
)
from cdistill.objective.losses import (
    concept_loss,
    corner_mask,
    foreground_mask,
    local_loss,
    logprob_gradient,
    position_gradients,
    prototype_gradient,
)
from cdistill.objective.prototypes import Prototypes
from cdistill.objective.rrclarc import SIGNAL_SOLVER, output_gradient, rr_classes, rrclarc_loss
from cdistill.robust.supervision import Supervision
from cdistill.tasks.classifier import Batch, to_plain
from cdistill.tasks.concept_artefacts import BLANK
from cdistill.tasks.probing import AdversarialProbeMixin, probe_values
from cdistill.teacher.stage import check_teacher_config
from cdistill.utils.capture import capture, resolve_module
from cdistill.utils.datamodule import ImageData

FORMS = ("prototype", "logit")
__all__ = ["BLANK", "FORMS", "ConceptDistillModule", "term_name"]


class ConceptDistillModule(AdversarialProbeMixin):
    """Concept-sensitive fine-tuning of a student (see the module docstring).

    Args:
        layer: Module path of the student layer the concept loss acts on (e.g. ``conv2``).
        form: ``prototype`` (``|cos(a - Pbar_y, v)|``, no double backward) or ``logit``
            (``∇_a`` of the ``target``, by one batched double backward).
        target: Scalar the logit form differentiates (:data:`cdistill.objective.losses.LOGIT_TARGETS`;
            ``random``: the logit of a class drawn per sample).
        lambda_c, lambda_p, lambda_l: Weights of the concept, prototype and local terms (0: off).
        lambda_o, lambda_s: Weights of the concept-only predictions and the latent counterfactuals.
        lambda_rr: Weight of RR-ClArC (squared output gradient along the signal CAVs; 0: off).
        lambda_adv: Weight of the student's side of the adversarial concept probe (0: off, no probe).
        concepts: :class:`~cdistill.objective.config.ConceptsConfig` as a dict (``spec``,
            ``terms``, the CAV keys of :class:`~cdistill.objective.config.CAVConfig`).
        prototypes: :class:`~cdistill.objective.config.PrototypeConfig` as a dict.
        local: :class:`~cdistill.objective.config.LocalConfig` as a dict.
        erasure: :class:`~cdistill.objective.config.ErasureConfig` as a dict (``None``: no erasure).
        teacher: ``None`` (CAVs fitted on the student's own activations) or the teacher stage's
            config (:mod:`cdistill.teacher.stage`): CAVs fitted on the teacher's features of the
            concept images mapped into the student's layer space. The teacher is used once,
            before training, and is never a submodule (not trained, not in checkpoints).
        outputs: :class:`~cdistill.objective.config.OutputConfig` as a dict.
        counterfactual: :class:`~cdistill.objective.config.CounterfactualConfig` as a dict.
        rrclarc: :class:`~cdistill.objective.config.RRClArCConfig` as a dict.
        probe: :class:`~cdistill.objective.config.ProbeConfig` as a dict.
        fit_batch_size: Batch size for computing activations when fitting artefacts.
        **kwargs: :class:`~cdistill.tasks.classifier.ClassifierModule` arguments.
    """

    #: What the method needs besides training labels (cdistill.robust.supervision).
    supervision: ClassVar[Supervision] = "concept images"

    def __init__(
        self,
        layer: str,
        form: str = "prototype",
        target: str = "logprob",
        lambda_c: float = 1.0,
        lambda_p: float = 0.0,
        lambda_l: float = 0.0,
        lambda_o: float = 0.0,
        lambda_s: float = 0.0,
        lambda_rr: float = 0.0,
        lambda_adv: float = 0.0,
        concepts: Mapping[str, Any] | None = None,
        prototypes: Mapping[str, Any] | None = None,
        local: Mapping[str, Any] | None = None,
        erasure: Mapping[str, Any] | None = None,
        teacher: Mapping[str, Any] | None = None,
        outputs: Mapping[str, Any] | None = None,
        counterfactual: Mapping[str, Any] | None = None,
        rrclarc: Mapping[str, Any] | None = None,
        probe: Mapping[str, Any] | None = None,
        fit_batch_size: int = 500,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        plain = {k: dict(to_plain(v) or {}) for k, v in
                 (("concepts", concepts), ("prototypes", prototypes), ("local", local))}
        erasure, teacher = (dict(to_plain(v) or {}) or None for v in (erasure, teacher))
        ObjectiveConfig(form, target, lambda_c, lambda_p, lambda_l, lambda_o, lambda_s, lambda_rr, lambda_adv)
        # auto: train() and the pipeline replace it by the base model's CAV-scan choice before building
        # this module (cdistill/concepts/layer_choice.py); built without data, auto is the structural stem.
        layer = resolve_layer(self.student, layer)
        self.concepts_cfg = ConceptsConfig.from_dict(plain["concepts"])
        weights = {"lambda_c": lambda_c, "lambda_o": lambda_o, "lambda_s": lambda_s, "lambda_rr": lambda_rr,
                   "lambda_adv": lambda_adv}
        for key, value in weights.items():
            if value > 0 and not self.concepts_cfg.terms:
                raise CdistillError(f"model.{key} > 0 but model.concepts.terms is empty: name at least one concept.")
        if lambda_rr > 0 and all(t.direction == "sensitize" for t in self.concepts_cfg.terms):
            raise CdistillError("model.lambda_rr > 0 but every concept term is sensitize: RR-ClArC only "
                                "desensitizes (use model.lambda_c for sensitize terms).")
        self.rr_cfg = RRClArCConfig.from_dict(dict(to_plain(rrclarc) or {}))
        self.probe_cfg = ProbeConfig.from_dict(dict(to_plain(probe) or {}))
        self.output_cfg = OutputConfig.from_dict(dict(to_plain(outputs) or {}))
        self.counterfactual_cfg = CounterfactualConfig.from_dict(dict(to_plain(counterfactual) or {}))
        self.shift_layers = self.counterfactual_cfg.layers_for(layer) if lambda_s > 0 else []
        for sl in self.shift_layers:
            if sl.layer != INPUT:  # the pixels are always there
                resolve_module(self.student, sl.layer)
        self.proto_cfg = PrototypeConfig.from_dict(plain["prototypes"])
        self.local_cfg = LocalConfig.from_dict(plain["local"])
        self.erasure_cfg = ErasureConfig.from_dict(erasure)
        resolve_module(self.student, layer)  # a wrong layer fails now, listing close names
        for spec in self.erasure_specs:
            resolve_module(self.student, spec.layer)
        if teacher is not None:
            check_teacher_config(teacher)
            if self.concepts_cfg.cav.refresh.active:
                raise CdistillError("Teacher-space CAVs are fitted once, before training: set "
                                    "model.concepts.refresh_every_n_steps=0 (or model.teacher=null).")
        self.save_hyperparameters({
            "layer": layer, "form": form, "target": target, "lambda_c": lambda_c, "lambda_p": lambda_p,
            "lambda_l": lambda_l, "lambda_o": lambda_o, "lambda_s": lambda_s, "lambda_rr": lambda_rr,
            "lambda_adv": lambda_adv, **plain, "erasure": erasure, "teacher": teacher,
            "outputs": self.output_cfg.to_dict(), "counterfactual": self.counterfactual_cfg.to_dict(),
            "rrclarc": self.rr_cfg.to_dict(), "probe": self.probe_cfg.to_dict(), "fit_batch_size": fit_batch_size,
        })
        self.layer, self.teacher_cfg = layer, teacher
        self.terms = [t.to_dict() for t in self.concepts_cfg.terms]
        self.cav_fitter = CAVFitter(self.concepts_cfg.cav, self.concepts_cfg.terms, self.hparams["num_classes"], layer)
        #: Figures of the last artefact fit (CAV accuracies per space, mapping terms): train() reports them.
        self.artefact_metrics: dict[str, float] = {}
        self.cavs = CAVBank()
        self.prototypes = Prototypes()
        #: The concept-image terms (:meth:`load_concept_images`); derived from the spec, not checkpointed.
        self.image_terms: ConceptImageTerms | None = None
        # Placeholders (resized when a checkpoint is loaded, see LowRankEraser).
        self.erasers = nn.ModuleDict({eraser_key(s.layer): LowRankEraser.identity(1) for s in self.erasure_specs})
        self._register_artefact_buffers()
        # RR-ClArC's signal CAVs and the probe exist only when their term is on, so a module
        # without them has the state dict it always had (older checkpoints load strictly).
        self.signal_fitter = None
        self.signal_cavs = None
        if lambda_rr > 0:
            signal = dataclasses.replace(self.concepts_cfg.cav, solver=SIGNAL_SOLVER)
            self.signal_fitter = CAVFitter(signal, self.concepts_cfg.terms, self.hparams["num_classes"], layer)
            self.signal_cavs = CAVBank()
            self.register_buffer("signal_cav_index", torch.full_like(self.cav_index, -1))
        self.probe = ConceptProbe(probe_values(self.concepts_cfg.terms, self.hparams["num_classes"])) \
            if lambda_adv > 0 else None

    # ------------------------------------------------------------------ hooks
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            # Before the optimizer is built and a resumed checkpoint is loaded into the probe.
            self.prepare_probe(self.trainer.datamodule)  # type: ignore[attr-defined]

    def on_fit_start(self) -> None:
        # Artefacts restored from a checkpoint are kept: resuming must not refit them.
        fresh = not bool(self.artefacts_fitted)
        if fresh:
            self.fit_artefacts(self.trainer.datamodule)  # type: ignore[attr-defined]
        if self.uses_concept_images and self.image_terms is None:
            # Derived from the spec (seeded), never checkpointed: a resumed run rebuilds them.
            self.load_concept_images(self.trainer.datamodule)  # type: ignore[attr-defined]
        if fresh and self.probe is not None:  # a resumed run keeps the checkpoint's probe
            self.warm_probe()

    def on_train_epoch_start(self) -> None:
        dm, epoch = self.trainer.datamodule, self.current_epoch  # type: ignore[attr-defined]
        if self.needs_prototypes and self.proto_cfg.refresh.epoch_due(epoch):
            self.refresh_prototypes(dm)
        if (self.needs_cavs or self.needs_signal_cavs) and self.concepts_cfg.cav.refresh.epoch_due(epoch):
            self.refresh_cavs(dm)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        dm = self.trainer.datamodule  # type: ignore[attr-defined]
        if self.erasure_specs and self._refit_due(self.global_step, batch_idx):
            self.fit_erasers(dm)
            self._broadcast_artefacts()
        if (self.needs_cavs or self.needs_signal_cavs) and self.concepts_cfg.cav.refresh.step_due(self.global_step):
            self.refresh_cavs(dm)

    # ------------------------------------------------------------------ objective
    def _local_mask(self, images: Tensor) -> Tensor:
        cfg = self.local_cfg
        if cfg.mask == "corners":
            return corner_mask(tuple(images.shape), int(cfg.size), images.device)
        raw = images * self.input_std.view(1, -1, 1, 1) + self.input_mean.view(1, -1, 1, 1)
        # Sampled with the module's generator (on the CPU), whose state checkpoints carry.
        mask = foreground_mask(raw.cpu(), float(cfg.threshold), float(cfg.fraction), self.rng)
        return mask.to(images.device)

    def _logit_target(self, labels: Tensor, num_classes: int) -> tuple[Tensor, str]:
        """``(labels, target)`` for :func:`logprob_gradient`. The ``random`` target (the logit
        of a class drawn per sample) is the ``logit`` target at classes drawn from the module's
        generator, whose state checkpoints carry (a resumed run draws the same classes).

        Args:
            labels: ``[B]`` true classes.
            num_classes: Number of logits.
        """
        target = str(self.hparams["target"])
        if target != "random":
            return labels, target
        drawn = torch.randint(0, num_classes, labels.shape, generator=self.rng)
        return drawn.to(labels.device), "logit"

    def _concept_terms(self, acts: Tensor, logits: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_c`` and each term's value ``concept/<term>`` for activations ``[B, *shape]``."""
        if self.hparams["form"] == "prototype":
            if acts.grad_fn is None:
                # a - P_y of a leaf (e.g. layer `input`) depends on no parameter: the term
                # would be logged but could never change the model.
                raise CdistillError(
                    f"model.form=prototype at layer {self.layer!r}: its activation depends on no "
                    "trainable parameter, so the prototype-form concept loss cannot train anything. "
                    "Use model.form=logit there, or a layer after a trainable one."
                )
            grads = prototype_gradient(acts, self.prototypes.mean_center(y))
        else:
            grads = logprob_gradient(acts, logits, *self._logit_target(y, logits.shape[1]))
        if self.cav_mode == "position":
            grads = position_gradients(grads, tuple(acts.shape[1:]))  # [B, H*W, C]
        lc, per_term = concept_loss(
            grads, y, self.cavs.vectors, self.cav_index, self.sensitize, self.term_weights,
            subspace=self.subspace, ranks=self.subspace_rank, position_weight=self.concepts_cfg.cav.position_weight,
        )
        terms = self.concepts_cfg.terms
        return lc, {f"concept/{term_name(t)}": value for t, value in zip(terms, per_term, strict=True)}

    def _rrclarc_terms(self, acts: Tensor, logits: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_RR`` and each desensitize term's value ``rrclarc/<term>`` (docs/methods.md §2.11)."""
        if self.signal_cavs is None:
            raise CdistillError("model.lambda_rr > 0 but no signal CAVs: the module was built with lambda_rr=0.")
        classes = rr_classes(y, logits.shape[1], self.rr_cfg.target, self.rng)
        grads = output_gradient(acts, logits, classes)
        if self.cav_mode == "position":
            grads = position_gradients(grads, tuple(acts.shape[1:]))  # [B, H*W, C]
        weights = self.term_weights * (~self.sensitize).to(self.term_weights.dtype)  # sensitize terms: none
        loss, per_term = rrclarc_loss(grads, classes, self.signal_cavs.vectors, self.signal_cav_index, weights)
        terms = self.concepts_cfg.terms
        return loss, {f"rrclarc/{term_name(t)}": value for t, value in zip(terms, per_term, strict=True)
                      if t.direction != "sensitize"}

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``loss`` and each active term (``task``, ``concept``, ``concept/<term>``,
        ``prototype``, ``local``, ``output``, ``counterfactual``, ``rrclarc``,
        ``rrclarc/<term>``, ``probe``, ``probe_fit``, ``probe_acc``), plus ``logits``. Callable
        without a Trainer once the artefacts are fitted (:meth:`fit_artefacts`), the concept
        images loaded (:meth:`load_concept_images`) and the probe sized (:meth:`prepare_probe`)."""
        hp = self.hparams
        x, y = batch["image"], batch["label"]
        if hp["lambda_l"] > 0 or (hp["lambda_c"] > 0 and hp["form"] == "logit") or hp["lambda_rr"] > 0:
            # The local loss differentiates w.r.t. the pixels; the logit form and RR-ClArC may
            # act at the input itself (layer ``input``), whose output needs a graph too.
            x = x.detach().requires_grad_(True)
        # The erasure hooks go first, so a concept loss at an erased layer sees erased activations.
        with self._erasing(), capture(self.student, self.layer, check_finite=False) as store:
            logits = self.student(x)
        acts = store[self.layer]
        task = F.cross_entropy(logits, y)
        out: dict[str, Tensor] = {"task": task, "logits": logits}
        loss = task
        if hp["lambda_c"] > 0:
            out["concept"], per_term = self._concept_terms(acts, logits, y)
            out |= per_term
            loss = loss + hp["lambda_c"] * out["concept"]
        if hp["lambda_p"] > 0:
            out["prototype"] = self.prototypes.loss(acts, y).mean()
            loss = loss + hp["lambda_p"] * out["prototype"]
        if hp["lambda_l"] > 0:
            out["local"] = local_loss(x, logits, y, self._local_mask(x.detach()))
            loss = loss + hp["lambda_l"] * out["local"]
        if hp["lambda_rr"] > 0:
            out["rrclarc"], per_rr = self._rrclarc_terms(acts, logits, y)
            out |= per_rr
            loss = loss + hp["lambda_rr"] * out["rrclarc"]
        if hp.get("lambda_o", 0.0) > 0 or hp.get("lambda_s", 0.0) > 0:
            if self.image_terms is None:
                raise CdistillError("model.lambda_o/lambda_s > 0 but the concept images are not loaded: "
                                    "call load_concept_images(datamodule) first (fit does).")
            terms = self.image_terms(self.student, self, batch["image"], y, self.rng,
                                     counterfactual=hp.get("lambda_s", 0.0) > 0)
            out["output"] = terms["output"]
            loss = loss + hp.get("lambda_o", 0.0) * out["output"]
            if "counterfactual" in terms:
                out["counterfactual"] = terms["counterfactual"]
                loss = loss + hp["lambda_s"] * out["counterfactual"]
        if hp["lambda_adv"] > 0:
            step = self.probe_losses()
            out |= {"probe": step.confusion, "probe_fit": step.fit, "probe_acc": step.accuracy}
            # The probe's own cross-entropy reaches only the probe's parameters (weight 1).
            loss = loss + hp["lambda_adv"] * step.confusion + step.fit
        out["loss"] = loss
        return out

    @property
    def uses_concept_images(self) -> bool:
        """A term that draws concept images is on: concept-only outputs, counterfactuals, probe."""
        return any(self.hparams.get(k, 0.0) > 0 for k in ("lambda_o", "lambda_s", "lambda_adv"))

    def load_concept_images(self, datamodule: ImageData) -> None:
        """Load the concept images of the output, counterfactual and probe terms (docs/methods.md
        §2.8-2.9, §2.12)."""
        sets, blank = load_image_sets(
            self.concepts_cfg.spec or "", self.concepts_cfg.terms, self.hparams["num_classes"], datamodule.normalize,
            datamodule.num_channels, datamodule.image_size, self.device, paired=self.output_cfg.target == "paired",
        )
        self.image_terms = ConceptImageTerms(sets, blank, self.output_cfg, self.shift_layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of the student, with the erasers applied."""
        with self._erasing():
            return self.student(x)
