"""ConceptDistillModule: task loss + concept loss + prototype loss + local loss.

``L = L_task + λ_c Σ_t w_t L_c,t + λ_p L_p + λ_L L_local + λ_o L_out + λ_s L_cf + λ_rr L_RR + λ_adv L_adv``
(docs/methods.md §2.7; the concept-image terms ``L_out`` and ``L_cf``: §2.8-2.9,
:mod:`cdistill.objective.concept_images`; RR-ClArC ``L_RR``: §2.11, :mod:`cdistill.objective.rrclarc`;
the adversarial probe ``L_adv``: §2.12, :mod:`cdistill.objective.adversarial_probe`, whose own
cross-entropy is added with weight 1 and trains only the probe); a term is computed only when
its λ is > 0, and every term is logged (``train/task``, ``train/concept``,
``train/concept/<term>``, ``train/prototype``, ``train/local``, ``train/rrclarc``,
``train/rrclarc/<term>``, ``train/probe``, ``train/probe_fit``, ``train/probe_acc``).

This module holds the Lightning hooks and the loss. The settings are one
:class:`~cdistill.objective.distill_config.DistillConfig` (every default lives in the typed
configs of :mod:`cdistill.objective.config`); the gradient-based terms are computed by a
:class:`~cdistill.objective.gradient_terms.GradientTerms`; the concept artefacts (CAVs,
prototypes, erasers) are fitted by :class:`~cdistill.tasks.concept_artefacts.ConceptArtefactsMixin`
with a :class:`~cdistill.objective.cav_fitter.CAVFitter`, the erasers applied and probed by
:class:`~cdistill.tasks.erasing.ErasureMixin`.
"""

from __future__ import annotations

import dataclasses
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
from cdistill.objective.concept_config import ConceptsConfig, term_name
from cdistill.objective.concept_images import INPUT, ConceptImageTerms, load_image_sets
from cdistill.objective.distill_config import FORMS, DistillConfig
from cdistill.objective.gradient_terms import GradientTerms
from cdistill.objective.losses import local_loss
from cdistill.objective.prototypes import Prototypes
from cdistill.objective.rrclarc import SIGNAL_SOLVER
from cdistill.robust.supervision import Supervision
from cdistill.tasks.classifier import Batch
from cdistill.tasks.concept_artefacts import BLANK
from cdistill.tasks.probing import AdversarialProbeMixin, probe_values
from cdistill.utils.capture import capture, resolve_module
from cdistill.utils.datamodule import ImageData, attached_image_data

__all__ = ["BLANK", "FORMS", "ConceptDistillModule", "term_name"]


class ConceptDistillModule(AdversarialProbeMixin):
    """Concept-sensitive fine-tuning of a student (see the module docstring).

    Args:
        layer: Module path of the student layer the concept loss acts on (e.g. ``conv2``;
            ``auto``: train() and the pipeline replace it by the base model's CAV-scan choice
            before building this module, cdistill/concepts/layer_choice.py; built without
            data, ``auto`` is the structural stem).
        **kwargs: The fields of :class:`~cdistill.objective.distill_config.DistillConfig` as
            plain values (``form``, ``target``, the weights ``lambda_*``, ``concepts``,
            ``prototypes``, ``local``, ``erasure``, ``teacher``, ``outputs``,
            ``counterfactual``, ``rrclarc``, ``probe``, ``fit_batch_size``: their meaning and
            defaults are there) and the :class:`~cdistill.tasks.classifier.ClassifierModule`
            arguments. The teacher is used once, before training, and is never a submodule
            (not trained, not in checkpoints).
    """

    #: What the method needs besides training labels (cdistill.robust.supervision).
    supervision: ClassVar[Supervision] = "concept images"

    def __init__(self, layer: str, **kwargs: Any) -> None:
        cfg, rest = DistillConfig.from_kwargs(kwargs)
        super().__init__(**rest)
        layer = resolve_layer(self.student, layer)
        self.shift_layers = cfg.counterfactual.layers_for(layer) if cfg.on("lambda_s") else []
        self._check_layers(layer, cfg)
        self.save_hyperparameters({"layer": layer, **cfg.to_dict()})
        self.layer = layer
        self.objective = GradientTerms(cfg, layer)
        self.terms = [t.to_dict() for t in cfg.concepts.terms]
        self.cav_fitter = CAVFitter(cfg.concepts.cav, cfg.concepts.terms, self.hparams["num_classes"], layer)
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
        if cfg.on("lambda_rr"):
            signal = dataclasses.replace(cfg.concepts.cav, solver=SIGNAL_SOLVER)
            self.signal_fitter = CAVFitter(signal, cfg.concepts.terms, self.hparams["num_classes"], layer)
            self.signal_cavs = CAVBank()
            self.register_buffer("signal_cav_index", torch.full_like(self.cav_index, -1))
        self.probe = ConceptProbe(probe_values(cfg.concepts.terms, self.hparams["num_classes"])) \
            if cfg.on("lambda_adv") else None

    def _check_layers(self, layer: str, cfg: DistillConfig) -> None:
        """A wrong layer (the concept layer, a counterfactual's or an eraser's) fails now, listing close names."""
        for sl in self.shift_layers:
            if sl.layer != INPUT:  # the pixels are always there
                resolve_module(self.student, sl.layer)
        resolve_module(self.student, layer)
        for spec in cfg.erasure.specs if cfg.erasure is not None else ():
            resolve_module(self.student, spec.layer)

    @property
    def cfg(self) -> DistillConfig:
        """The task's settings (those of its objective); setting them rebuilds the objective."""
        return self.objective.cfg

    @cfg.setter
    def cfg(self, value: DistillConfig) -> None:
        self.objective = GradientTerms(value, self.layer)

    @property
    def concepts_cfg(self) -> ConceptsConfig:
        """The concept settings, under the name the intrinsic task gives them too (preflight reads either)."""
        return self.cfg.concepts

    # ------------------------------------------------------------------ hooks
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit":
            # Before the optimizer is built and a resumed checkpoint is loaded into the probe.
            self.prepare_probe(attached_image_data(self.trainer, self))

    def on_fit_start(self) -> None:
        # Artefacts restored from a checkpoint are kept: resuming must not refit them.
        fresh = not bool(self.artefacts_fitted)
        if fresh:
            self.fit_artefacts(attached_image_data(self.trainer, self))
        if self.uses_concept_images and self.image_terms is None:
            # Derived from the spec (seeded), never checkpointed: a resumed run rebuilds them.
            self.load_concept_images(attached_image_data(self.trainer, self))
        if fresh and self.probe is not None:  # a resumed run keeps the checkpoint's probe
            self.warm_probe()

    def on_train_epoch_start(self) -> None:
        dm, epoch = attached_image_data(self.trainer, self), self.current_epoch
        if self.needs_prototypes and self.cfg.prototypes.refresh.epoch_due(epoch):
            self.refresh_prototypes(dm)
        if (self.needs_cavs or self.needs_signal_cavs) and self.cfg.concepts.cav.refresh.epoch_due(epoch):
            self.refresh_cavs(dm)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        dm = attached_image_data(self.trainer, self)
        if self.erasure_specs and self._refit_due(self.global_step, batch_idx):
            self.fit_erasers(dm)
            self._broadcast_artefacts()
        if (self.needs_cavs or self.needs_signal_cavs) and self.cfg.concepts.cav.refresh.step_due(self.global_step):
            self.refresh_cavs(dm)

    def compute_losses(self, batch: Batch) -> dict[str, Tensor]:
        """``loss`` and each active term (``task``, ``concept``, ``concept/<term>``,
        ``prototype``, ``local``, ``output``, ``counterfactual``, ``rrclarc``,
        ``rrclarc/<term>``, ``probe``, ``probe_fit``, ``probe_acc``), plus ``logits``. Callable
        without a Trainer once the artefacts are fitted (:meth:`fit_artefacts`), the concept
        images loaded (:meth:`load_concept_images`) and the probe sized (:meth:`prepare_probe`)."""
        cfg, terms = self.cfg, self.objective
        x, y = batch["image"], batch["label"]
        if cfg.on("lambda_l") or (cfg.on("lambda_c") and cfg.form == "logit") or cfg.on("lambda_rr"):
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
        if cfg.on("lambda_c"):
            out["concept"], per_term = terms.concept(self, acts, logits, y)
            out |= per_term
            loss = loss + cfg.lambda_c * out["concept"]
        if cfg.on("lambda_p"):
            out["prototype"] = self.prototypes.loss(acts, y).mean()
            loss = loss + cfg.lambda_p * out["prototype"]
        if cfg.on("lambda_l"):
            out["local"] = local_loss(x, logits, y, terms.local_mask(self, x.detach()))
            loss = loss + cfg.lambda_l * out["local"]
        if cfg.on("lambda_rr"):
            out["rrclarc"], per_rr = terms.rrclarc(self, acts, logits, y)
            out |= per_rr
            loss = loss + cfg.lambda_rr * out["rrclarc"]
        if cfg.on("lambda_o") or cfg.on("lambda_s"):
            if self.image_terms is None:
                raise CdistillError("model.lambda_o/lambda_s > 0 but the concept images are not loaded: "
                                    "call load_concept_images(datamodule) first (fit does).")
            images = self.image_terms(self.student, self, batch["image"], y, self.rng, counterfactual=cfg.on("lambda_s"))
            out["output"] = images["output"]
            loss = loss + cfg.lambda_o * out["output"]
            if "counterfactual" in images:
                out["counterfactual"] = images["counterfactual"]
                loss = loss + cfg.lambda_s * out["counterfactual"]
        if cfg.on("lambda_adv"):
            step = self.probe_losses()
            out |= {"probe": step.confusion, "probe_fit": step.fit, "probe_acc": step.accuracy}
            # The probe's own cross-entropy reaches only the probe's parameters (weight 1).
            loss = loss + cfg.lambda_adv * step.confusion + step.fit
        out["loss"] = loss
        return out

    @property
    def uses_concept_images(self) -> bool:
        """A term that draws concept images is on: concept-only outputs, counterfactuals, probe."""
        return any(self.cfg.on(k) for k in ("lambda_o", "lambda_s", "lambda_adv"))

    def load_concept_images(self, datamodule: ImageData) -> None:
        """Load the concept images of the output, counterfactual and probe terms (docs/methods.md
        §2.8-2.9, §2.12)."""
        sets, blank = load_image_sets(
            self.cfg.concepts.spec or "", self.cfg.concepts.terms, self.hparams["num_classes"], datamodule.normalize,
            datamodule.num_channels, datamodule.image_size, self.device, paired=self.cfg.outputs.target == "paired",
        )
        self.image_terms = ConceptImageTerms(sets, blank, self.cfg.outputs, self.shift_layers)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, num_classes]`` of the student, with the erasers applied."""
        with self._erasing():
            return self.student(x)
