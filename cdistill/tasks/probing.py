"""The adversarial concept probe of the distill task (docs/methods.md §2.12): its sizing, its
warm start, its parameter group and its step.

The game itself is :mod:`cdistill.objective.adversarial_probe`. This mixin holds what ties it
to the Lightning module: the probe is a submodule of the task (checkpoints carry its weights,
the optimizer's state carries its moments, and ``student.pt``, the student's own state dict,
does not hold it); it is sized in :meth:`prepare_probe`, which ``setup`` calls before the
optimizer is built and before a resumed checkpoint is loaded into it; it is fitted on the
starting model's activations of all concept images once, before the first step (a resumed run
keeps the checkpoint's).
"""

from __future__ import annotations

import logging

import hydra.utils
import torch
from torch import Tensor

from cdistill.errors import CdistillError
from cdistill.objective.adversarial_probe import (
    ConceptProbe,
    ProbeStep,
    fit_probe,
    layer_features,
    probe_step,
    probed_sets,
)
from cdistill.objective.concept_images import ConceptImageSet, ConceptImageTerms
from cdistill.objective.config import ConceptTerm
from cdistill.tasks.concept_artefacts import ConceptArtefactsMixin
from cdistill.utils.capture import eval_mode
from cdistill.utils.datamodule import SplitData

log = logging.getLogger(__name__)


def probe_values(terms: tuple[ConceptTerm, ...], num_classes: int) -> list[int]:
    """The number of cue values of each probed term, in the order of
    :func:`~cdistill.objective.adversarial_probe.probed_sets` (desensitize terms with ``{y}``
    and more than one class)."""
    values = []
    for term in terms:
        if term.direction == "sensitize" or "{y}" not in term.concept:
            continue
        n = len(term.classes) if term.classes is not None else num_classes
        if n > 1:
            values.append(n)
    return values


class AdversarialProbeMixin(ConceptArtefactsMixin):
    """The probe's plumbing (mixed into the distill task, which sets ``probe``, ``cfg``
    (``cfg.probe``), ``image_terms`` and ``layer``)."""

    probe: ConceptProbe | None
    image_terms: ConceptImageTerms | None

    def prepare_probe(self, datamodule: SplitData) -> None:
        """Size the probe for the layer's output on the data's images (``[ΣV, d]``); a no-op
        without a probe or at the right size. Runs the student to the layer on one blank image."""
        if self.probe is None:
            return
        blank = torch.zeros(1, datamodule.num_channels, datamodule.image_size, datamodule.image_size, device=self.device)
        with torch.no_grad(), eval_mode(self.student):
            dim = layer_features(self.student, self.student, self.layer, blank).shape[1]
        self.probe.resize(int(dim))

    @property
    def probed(self) -> list[ConceptImageSet]:
        """The concept-image sets the probe tells apart (one block of the probe each)."""
        if self.image_terms is None:
            raise CdistillError("model.lambda_adv > 0 but the concept images are not loaded: "
                                "call load_concept_images(datamodule) first (fit does).")
        return probed_sets(self.image_terms.sets)

    def _features(self, images: Tensor) -> Tensor:
        """The layer's flattened output for images (the task's forward: erasers included)."""
        return layer_features(self, self.student, self.layer, images)

    def warm_probe(self) -> None:
        """Fit the probe on the current student's activations of every concept image of every
        probed value (``model.probe.warm_steps`` full-batch steps); record its accuracy."""
        assert self.probe is not None
        bs = int(self.hparams["fit_batch_size"])
        with torch.no_grad(), eval_mode(self.student):
            feats = [[torch.cat([self._features(v[i : i + bs]) for i in range(0, len(v), bs)]) for v in s.values]
                     for s in self.probed]
        cfg = self.cfg.probe
        acc = fit_probe(self.probe, feats, cfg.warm_steps, cfg.warm_lr, cfg.smoothing)
        self.artefact_metrics["probe/acc_start"] = acc
        log.info("adversarial probe at %s fitted on the starting model: accuracy %.3f", self.layer, acc)
        for lg in self.loggers:
            lg.log_metrics({"probe/acc_start": acc}, step=0)

    def probe_losses(self) -> ProbeStep:
        """This step's probe game on freshly drawn concept images (the task's generator)."""
        assert self.probe is not None
        return probe_step(self.probe, self.probed, self._features, self.cfg.probe.per_set, self.rng,
                          self.cfg.probe.smoothing)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The configured optimizer; with ``model.probe.lr`` the probe's parameters are a param
        group of their own at that learning rate (other settings: the optimizer's defaults)."""
        if self.probe is None or self.cfg.probe.lr is None:
            return super().build_optimizer()
        own = {id(p) for p in self.probe.parameters()}
        rest = [p for p in self.parameters() if id(p) not in own]
        opt: torch.optim.Optimizer = hydra.utils.instantiate(self.hparams["optimizer"], params=rest)
        opt.add_param_group({"params": list(self.probe.parameters()), "lr": float(self.cfg.probe.lr)})
        return opt
