"""The gradient-based terms of the distill objective: the concept loss ``L_c`` (docs/methods.md
§2.4-2.6), RR-ClArC ``L_RR`` (§2.11) and the local loss's mask, computed from a batch's
activations at the concept layer and the fitted artefacts.

:class:`GradientTerms` holds the settings; the artefacts (CAVs, prototypes, index buffers) are
read at each call from their owner, the task module (:class:`Artefacts`), whose buffers are
replaced when they are refitted, loaded or moved.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from cdistill.concepts.cav import CAVBank
from cdistill.errors import CdistillError
from cdistill.objective.concept_config import term_name
from cdistill.objective.distill_config import DistillConfig
from cdistill.objective.losses import (
    concept_loss,
    corner_mask,
    foreground_mask,
    logprob_gradient,
    position_gradients,
    prototype_gradient,
)
from cdistill.objective.prototypes import Prototypes
from cdistill.objective.rrclarc import output_gradient, rr_classes, rrclarc_loss


class Artefacts(Protocol):
    """What the terms read from their owner (the distill task): the fitted artefacts, the
    terms' weights and directions ``[T]``, the pixel statistics ``[C]`` and the generator whose
    state checkpoints carry (a resumed run draws what the uninterrupted one drew)."""

    cavs: CAVBank
    cav_index: Tensor
    signal_cavs: CAVBank | None
    signal_cav_index: Tensor
    prototypes: Prototypes
    sensitize: Tensor
    term_weights: Tensor
    subspace: Tensor
    subspace_rank: Tensor
    input_mean: Tensor
    input_std: Tensor
    rng: torch.Generator


class GradientTerms:
    """The concept loss, RR-ClArC and the local mask of the distill task.

    Args:
        cfg: The task's settings.
        layer: The resolved concept layer (for messages).
    """

    def __init__(self, cfg: DistillConfig, layer: str) -> None:
        self.cfg = cfg
        self.layer = layer

    def local_mask(self, art: Artefacts, images: Tensor) -> Tensor:
        """The local loss's mask ``[B, 1, H, W]`` for normalised images ``[B, C, H, W]``."""
        cfg = self.cfg.local
        if cfg.mask == "corners":
            return corner_mask(tuple(images.shape), int(cfg.size), images.device)
        raw = images * art.input_std.view(1, -1, 1, 1) + art.input_mean.view(1, -1, 1, 1)
        # Sampled with the module's generator (on the CPU), whose state checkpoints carry.
        mask = foreground_mask(raw.cpu(), float(cfg.threshold), float(cfg.fraction), art.rng)
        return mask.to(images.device)

    def logit_target(self, art: Artefacts, labels: Tensor, num_classes: int) -> tuple[Tensor, str]:
        """``(labels, target)`` for :func:`logprob_gradient`. The ``random`` target (the logit
        of a class drawn per sample) is the ``logit`` target at classes drawn from the module's
        generator.

        Args:
            art: The owner of the generator.
            labels: ``[B]`` true classes.
            num_classes: Number of logits.
        """
        target = self.cfg.target
        if target != "random":
            return labels, target
        drawn = torch.randint(0, num_classes, labels.shape, generator=art.rng)
        return drawn.to(labels.device), "logit"

    def concept(self, art: Artefacts, acts: Tensor, logits: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_c`` and each term's value ``concept/<term>`` for activations ``[B, *shape]``,
        logits ``[B, K]`` and labels ``[B]``."""
        if self.cfg.form == "prototype":
            if acts.grad_fn is None:
                # a - P_y of a leaf (e.g. layer `input`) depends on no parameter: the term
                # would be logged but could never change the model.
                raise CdistillError(
                    f"model.form=prototype at layer {self.layer!r}: its activation depends on no "
                    "trainable parameter, so the prototype-form concept loss cannot train anything. "
                    "Use model.form=logit there, or a layer after a trainable one."
                )
            grads = prototype_gradient(acts, art.prototypes.mean_center(y))
        else:
            grads = logprob_gradient(acts, logits, *self.logit_target(art, y, logits.shape[1]))
        cav = self.cfg.concepts.cav
        if cav.cav_mode == "position":
            grads = position_gradients(grads, tuple(acts.shape[1:]))  # [B, H*W, C]
        lc, per_term = concept_loss(
            grads, y, art.cavs.vectors, art.cav_index, art.sensitize, art.term_weights,
            subspace=art.subspace, ranks=art.subspace_rank, position_weight=cav.position_weight,
        )
        terms = self.cfg.concepts.terms
        return lc, {f"concept/{term_name(t)}": value for t, value in zip(terms, per_term, strict=True)}

    def rrclarc(self, art: Artefacts, acts: Tensor, logits: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``L_RR`` and each desensitize term's value ``rrclarc/<term>`` (docs/methods.md §2.11)."""
        if art.signal_cavs is None:
            raise CdistillError("model.lambda_rr > 0 but no signal CAVs: the module was built with lambda_rr=0.")
        classes = rr_classes(y, logits.shape[1], self.cfg.rrclarc.target, art.rng)
        grads = output_gradient(acts, logits, classes)
        if self.cfg.concepts.cav.cav_mode == "position":
            grads = position_gradients(grads, tuple(acts.shape[1:]))  # [B, H*W, C]
        weights = art.term_weights * (~art.sensitize).to(art.term_weights.dtype)  # sensitize terms: none
        loss, per_term = rrclarc_loss(grads, classes, art.signal_cavs.vectors, art.signal_cav_index, weights)
        terms = self.cfg.concepts.terms
        return loss, {f"rrclarc/{term_name(t)}": value for t, value in zip(terms, per_term, strict=True)
                      if t.direction != "sensitize"}
