"""Concept-only predictions as a training constraint (docs/methods.md §2.8).

The gradient-direction concept loss constrains an infinitesimal quantity at one layer, and a
network can satisfy it while it keeps reading the cue. This term constrains what the cue does
to the *output*, through the whole network, with finite inputs: the images of a bias concept
(``color_3``: coloured strokes, no digit) carry no evidence about the class, so a model that
does not rely on the concept predicts them without class information. A biased model predicts
class ``k`` on concept ``k`` images; the term pulls those predictions to

* ``uniform``: the uniform distribution (``KL(u || p)``, 0 at uniform);
* ``negative``: the model's own mean prediction on the term's negative images (``KL(q || p)``,
  ``q`` held fixed): adding the concept to an image must not change the prediction;
* ``pooled``: the mean prediction over all of the term's concept images (``KL(q || p)``, ``q``
  held fixed): predictions must not depend on *which* concept value is present;
* ``paired``: invariance on paired concept images. The spec's generated sets are drawn from one
  shared stream, so image ``i`` of every value's set and of the negative set shows the same
  strokes with another value of the cue, or without it; ``q_i`` is the mean prediction over
  image ``i``'s versions (held fixed) and each version is pulled to it: changing or removing the
  cue on the *same* shape must not change the prediction.

Two ways to read "the predictions" (``reduce``):

* ``image``: every concept image's own prediction is pulled to ``q``. Right when a concept image
  shows the cue and nothing else (coloured strokes, a glyph on strokes).
* ``set``: the *mean* prediction over each cue value's images is pulled to ``q``. Right also when
  concept images show more than the cue: a folder of real women's faces has faces of every age,
  and each face's age is evidence the model should use; only the average over the set must not
  lean towards the class the cue points to.

Concept images are sampled per step with the task's generator (a resumed run draws the same).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

#: What concept-image predictions are pulled towards (see the module docstring).
OUTPUT_TARGETS = ("uniform", "negative", "pooled", "paired")
#: Whose prediction is pulled to the target: each image's, or each cue value's mean (docstring).
OUTPUT_REDUCTIONS = ("image", "set")


def sample_rows(count: int, per_set: int, generator: torch.Generator | None) -> Tensor:
    """``per_set`` indices in ``[0, count)`` (with replacement), drawn on the CPU -> ``[per_set]``."""
    return torch.randint(0, count, (per_set,), generator=generator)


def output_divergence(concept_logits: Tensor, target: str, reference_logits: Tensor | None = None,
                      sets: int = 0) -> Tensor:
    """Mean ``KL(q || p)`` of the concept images' predictions ``p`` from a target ``q``.

    Args:
        concept_logits: ``[M, C]`` logits of concept images (``sets > 0``: ``sets`` equal blocks,
            one per cue value, in order).
        target: One of :data:`OUTPUT_TARGETS`.
        reference_logits: ``[M', C]`` logits of the negative images (``negative``; ``paired``:
            ``[per_set, C]``, image ``i`` the version without the cue of each block's image ``i``).
        sets: ``0``: each image's prediction is ``p`` (``reduce=image``; always for ``paired``);
            ``V > 0``: ``p`` is the mean predicted distribution of each of the ``V`` blocks
            (``reduce=set``).

    Returns:
        Scalar, ``>= 0``; ``0`` when every prediction (every block's mean) equals ``q``.
    """
    if sets and target != "paired":  # a pair is compared image by image
        # log of the mean distribution per block: [V, C]
        probs = F.softmax(concept_logits, dim=1).reshape(sets, -1, concept_logits.shape[1]).mean(1)
        logp = probs.clamp_min(1e-12).log()
    else:
        logp = F.log_softmax(concept_logits, dim=1)
    num_classes = concept_logits.shape[1]
    if target == "paired":
        if reference_logits is None:
            raise ValueError("the 'paired' target needs the negative images' logits (the versions without the cue)")
        versions = torch.cat([concept_logits, reference_logits]).reshape(-1, len(reference_logits), num_classes)
        logp = F.log_softmax(versions, dim=-1)  # [V + 1, per_set, C]
        q = logp.detach().exp().mean(0, keepdim=True).clamp_min(1e-12)  # each pair's mean prediction
        return (q * (q.log() - logp)).sum(-1).mean()
    if target == "uniform":
        # KL(u || p) = -log C - mean_j log p_j
        return (-logp.mean(1) - math.log(num_classes)).mean()
    if target == "negative":
        if reference_logits is None:
            raise ValueError("the 'negative' target needs the negative images' logits")
        q = F.softmax(reference_logits.detach(), dim=1).mean(0, keepdim=True)
    elif target == "pooled":
        q = logp.detach().exp().mean(0, keepdim=True)
    else:
        raise ValueError(f"unknown output target {target!r}; use one of {OUTPUT_TARGETS}")
    q = q.clamp_min(1e-12)
    return (q * (q.log() - logp)).sum(1).mean()
