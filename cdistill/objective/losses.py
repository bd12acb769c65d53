"""Concept-distillation loss terms (docs/methods.md §2.4 and §2.6), as pure functions.

Notation: ``a`` the layer activation of a sample flattened to ``[d]``, ``v`` a unit CAV,
``Pbar_y`` the mean prototype of the sample's class.

* Prototype form. ``∇_a L_p = (2K/d)(a - Pbar_y)`` and cosine ignores positive scale, so
  ``cos(∇_a L_p, v) = cos(a - Pbar_y, v)``: one batched expression, no double backward.
* Logit form. ``∇_a log p(y|x)`` from one batched ``autograd.grad(create_graph=True)``:
  samples do not interact in the forward pass (no batch norm in train mode between the
  layer and the logits is assumed), so the gradient of the batch sum gives every
  per-sample gradient at once.
* Desensitize: ``|cos|`` (the gradient becomes orthogonal to the concept). Sensitize:
  ``1 - cos`` (the gradient points along the concept).
* The local loss "+L" (RRR style): squared input gradient of the task loss inside a mask.

All losses are means over the samples they apply to (the original code summed over batch
and concepts; a mean keeps λ independent of the batch size: λ_mean = λ_sum × B).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cdistill.errors import CdistillError, NonFiniteError

DIRECTIONS = ("desensitize", "sensitize")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values [T, B]`` over ``mask [T, B]`` per row -> ``[T]`` (0 for empty rows)."""
    m = mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def prototype_gradient(acts: Tensor, pbar: Tensor) -> Tensor:
    """The direction of ``∇_a L_p``: ``a - Pbar_y`` (``[B, d]``), positive scale dropped."""
    return acts.reshape(acts.shape[0], -1) - pbar


#: Every scalar whose gradient a concept term aligns with the CAVs, or TCAV differentiates:
#: ``logprob`` (log p(y|x)), ``logit`` (z_y), ``margin`` (z_y - logsumexp of the others),
#: ``random`` (z_k, k drawn per sample; of a reconstruction branch: <u, output>, u Gaussian),
#: ``loss`` (a reconstruction branch's own loss) and ``output`` (½||branch output||²).
TARGETS = ("logprob", "logit", "margin", "random", "loss", "output")
#: The targets of a classifier's logits (:func:`logit_target`).
LOGIT_TARGETS = TARGETS[:4]
#: The targets of a reconstruction branch (:class:`~cdistill.tasks.intrinsic.IntrinsicModule`).
BRANCH_TARGETS = TARGETS[3:]


def logit_target(logits: Tensor, labels: Tensor, target: str = "logprob", generator: torch.Generator | None = None) -> Tensor:
    """Per-sample scalar whose gradient the logit form aligns with the CAVs.

    Args:
        logits: ``[B, num_classes]``.
        labels: ``[B]``.
        target: ``logprob``: ``log p(y|x)`` (vanishes as ``p(y|x) -> 1``, so a saturated
            model has no usable direction); ``logit``: the true-class logit ``z_y`` (Kim et
            al.'s TCAV target); ``margin``: the log-odds ``z_y - logsumexp_{k≠y} z_k`` (does
            not saturate, and counts the competing classes by their probability);
            ``random``: the logit ``z_k`` of a class drawn uniformly per sample (an unbiased
            estimate of the mean over classes: every class's logit is desensitized, not only
            the true one's).
        generator: RNG for ``random``.

    Returns:
        ``[B]``.
    """
    if target == "logprob":
        return F.log_softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]
    if target == "logit":
        return logits.gather(1, labels[:, None])[:, 0]
    if target == "margin":
        others = logits.masked_fill(F.one_hot(labels, logits.shape[1]).bool(), float("-inf"))
        return logits.gather(1, labels[:, None])[:, 0] - torch.logsumexp(others, dim=1)
    if target == "random":
        k = torch.randint(0, logits.shape[1], labels.shape, generator=generator,
                          device="cpu" if generator is not None else labels.device).to(labels.device)
        return logits.gather(1, k[:, None])[:, 0]
    raise CdistillError(f"logit target {target!r}: use one of {LOGIT_TARGETS}.")


def logprob_gradient(acts: Tensor, logits: Tensor, labels: Tensor, target: str = "logprob") -> Tensor:
    """``∇_a log p(y|x)`` (or another :func:`logit_target`) per sample, differentiable
    (``create_graph=True``).

    Args:
        acts: The layer activation ``[B, ...]`` that ``logits`` were computed from.
        logits: ``[B, num_classes]``.
        labels: ``[B]``.
        target: See :func:`logit_target`.

    Returns:
        ``[B, d]``.
    """
    (grad,) = torch.autograd.grad(logit_target(logits, labels, target).sum(), acts, create_graph=True)
    return grad.reshape(grad.shape[0], -1)


CAV_MODES = ("flatten", "position")
POSITION_WEIGHTS = ("norm", "uniform")


def position_gradients(grads: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Split flattened conv-map gradients into per-position channel vectors.

    Args:
        grads: ``[B, d]`` with ``d = C * H * W`` (the flattening of ``[B, C, H, W]``).
        shape: The per-sample activation shape ``(C, H, W)`` (or ``(C, ...)``: every
            trailing dimension is a position).

    Returns:
        ``[B, P, C]`` with ``P = H * W``: the ``C``-dim gradient at each position.
    """
    if len(shape) < 2:
        raise CdistillError(
            f"cav_mode=position needs a conv map [C, H, W] at the concept layer; it has shape {tuple(shape)}."
        )
    c = shape[0]
    return grads.reshape(grads.shape[0], c, -1).transpose(1, 2)


def subspace_basis(vectors: Tensor, rank: int | None = None) -> Tensor:
    """Orthonormal basis of the span of ``vectors [m, c]``, or of its ``rank`` main directions.

    Args:
        vectors: ``[m, c]`` CAVs.
        rank: ``None``: the whole span (directions below 1e-6 of the largest singular value,
            i.e. already spanned up to rounding, are dropped); an int: the top ``rank`` right
            singular vectors (the directions the CAVs share most; e.g. 2 for the chroma plane
            that colour-vs-grey CAVs at the pixels span).

    Returns:
        ``[r, c]`` orthonormal rows.
    """
    _, sv, vh = torch.linalg.svd(vectors, full_matrices=False)
    keep = sv > sv.max().clamp_min(1e-30) * 1e-6
    if rank is not None:
        keep &= torch.arange(len(sv), device=sv.device) < rank
    return vh[keep]


def check_subspace_rank(vectors: Tensor, rank: int | None, term: str) -> None:
    """Refuse a subspace term that cannot train.

    A ``rank`` above the dimension the CAVs span would silently be cut to the span, and a
    subspace that fills the whole space (e.g. 10 colour CAVs at 3-channel pixels, rank 3)
    holds every gradient entirely: the loss is the constant 1.0 (desensitize) or 0.0
    (sensitize) with no gradient.

    Args:
        vectors: ``[m, c]`` the term's CAVs.
        rank: The term's ``rank`` (None or 0: the whole span).
        term: The term's name (for the message).

    Raises:
        CdistillError: ``rank`` above the span, or a basis of all ``c`` dimensions.
    """
    span = len(subspace_basis(vectors))
    dim = vectors.shape[-1]
    if rank and rank > span:
        raise CdistillError(
            f"Concept term {term!r}: rank={rank} but its {len(vectors)} CAV(s) (after the accuracy gate) span "
            f"only {span} dimension(s). Set the term's rank to at most {span}."
        )
    used = rank or span
    if used >= dim:
        raise CdistillError(
            f"Concept term {term!r}: its subspace (rank {used}) fills the whole {dim}-dim space of the "
            "layer, so every gradient lies in it and the loss is constant (no gradient). Set the term's "
            f"rank below {dim}, or drop subspace: true."
        )


def _aggregate(along: Tensor, norms: Tensor, weighting: str, eps: float) -> Tensor:
    """Per-sample fraction of the gradient along a direction, over positions.

    Args:
        along: ``[B, P]`` signed (or, for subspaces, non-negative) component along the CAV
            at each position.
        norms: ``[B, P]`` gradient norms at each position.
        weighting: ``norm``: ``Σ_p along_p / Σ_p ||g_p||`` (positions count by their gradient
            norm; with ``P = 1`` this is the cosine); ``uniform``: ``mean_p along_p / ||g_p||``.

    Returns:
        ``[B]``.
    """
    if weighting == "norm":
        return along.sum(-1) / norms.sum(-1).clamp_min(eps)
    if weighting == "uniform":
        return (along / norms.clamp_min(eps)).mean(-1)
    raise CdistillError(f"position_weight={weighting!r}: use one of {POSITION_WEIGHTS}.")


def concept_loss(
    grads: Tensor,
    labels: Tensor,
    cavs: Tensor,
    cav_index: Tensor,
    sensitize: Tensor,
    weights: Tensor,
    *,
    subspace: Tensor | None = None,
    ranks: Tensor | None = None,
    position_weight: str = "norm",
    eps: float = 1e-12,
) -> tuple[Tensor, Tensor]:
    """Weighted sum over concept terms of the mean per-sample concept loss.

    With ``grads [B, d]`` (``cav_mode=flatten``) a term's per-sample loss is ``|cos(g, v)|``
    (desensitize) or ``1 - cos(g, v)`` (sensitize). With ``grads [B, P, c]``
    (``cav_mode=position``: the ``c`` channels of a conv map at each of ``P`` positions, CAVs
    fitted in channel space) the cosine becomes ``Σ_p |g_p·v| / Σ_p ||g_p||`` (``norm``
    weighting: the cosine at each position, weighted by its gradient norm) or
    ``mean_p |cos(g_p, v)|`` (``uniform``); sensitize uses the signed sum and ``1 - ...``.
    A subspace term uses, instead of ``|g·v|``, the norm ``||Q g||`` of the gradient's
    projection on the span (orthonormal basis ``Q``) of all the term's CAVs, so its loss is
    the fraction of the gradient in the concept subspace (sensitize: ``1 - fraction``).

    Args:
        grads: ``[B, d]`` or ``[B, P, c]`` gradient directions (prototype or logit form).
        labels: ``[B]`` classes.
        cavs: ``[m, d]`` (or ``[m, c]``) unit CAVs (rows of a CAV bank).
        cav_index: ``[T, num_classes]`` row of ``cavs`` each term uses for a sample of each
            class, or -1 where the term does not apply to that class (class scope).
        sensitize: ``[T]`` bool, per term.
        weights: ``[T]`` per-term weights.
        subspace: ``[T]`` bool: the term penalises the projection on the span of its CAVs
            (every row of ``cavs`` in ``cav_index[t]``) rather than one CAV per class.
        ranks: ``[T]`` rank of each subspace term's basis (0: the whole span), see
            :func:`subspace_basis`.
        position_weight: ``norm`` or ``uniform`` (only matters when ``P > 1``).
        eps: Floor of the norms in the denominators (after the per-sample rescaling).

    Returns:
        ``(loss, per_term)``: the scalar ``Σ_t w_t mean_b L_tb`` and the ``[T]`` unweighted
        term means (for logging).
    """
    if grads.ndim == 2:
        grads = grads.unsqueeze(1)  # one "position": the flattened map
    # NaN/Inf is a fault upstream (inputs or activations), not saturation: the rule below would
    # otherwise count such samples as unusable and return a silent 0.0.
    bad = ~torch.isfinite(grads.detach()).flatten(1).all(1)  # [B]
    if bool(bad.any()):
        raise NonFiniteError(
            f"Concept loss: the gradients of {int(bad.sum())} of {len(bad)} samples hold NaN/Inf "
            "(non-finite inputs or activations at the concept layer)"
        )
    # Every ratio below is invariant to a positive per-sample scale: rescale each sample to a
    # max-abs of 1 so that tiny gradients (a saturated model) neither underflow in the norms
    # nor meet the eps floor.
    # A sample whose gradient has (nearly) underflowed has no usable direction, and dividing by
    # its scale would overflow in the backward pass (1/denormal = inf, then inf * 0 = NaN in the
    # weights): such samples are left out of the term's mean.
    scale = grads.detach().abs().amax(dim=(1, 2), keepdim=True)
    # sqrt(smallest normal): ~1e-19 in float32, ~1e-154 in float64; 1/scale stays far from overflow.
    usable = scale > torch.finfo(grads.dtype).tiny ** 0.5
    grads = torch.where(usable, grads / torch.where(usable, scale, torch.ones_like(scale)), torch.zeros_like(grads))
    if grads.shape[-1] != cavs.shape[-1]:
        raise CdistillError(
            f"Gradient dimension {grads.shape[-1]} does not match CAV dimension {cavs.shape[-1]}: "
            "the CAVs were fitted at another layer (or in another cav_mode)."
        )
    num_terms = cav_index.shape[0]
    if subspace is None:
        subspace = torch.zeros(num_terms, dtype=torch.bool)
    unit = cavs / cavs.norm(dim=-1, keepdim=True).clamp_min(eps)
    norms = grads.norm(dim=-1)  # [B, P]
    rows = cav_index[:, labels]  # [T, B]
    applies = (rows >= 0) & usable.view(1, -1)
    per_sample = []
    for t in range(num_terms):
        sens = bool(sensitize[t])
        if bool(subspace[t]):
            members = torch.unique(cav_index[t][cav_index[t] >= 0])
            rank = int(ranks[t]) if ranks is not None else 0
            basis = subspace_basis(unit[members], rank or None)  # [r, c]
            along = (grads @ basis.T).norm(dim=-1)  # [B, P]
        else:
            v = unit[rows[t].clamp_min(0)]  # [B, c]
            along = torch.einsum("bpc,bc->bp", grads, v)
            if not sens:
                along = along.abs()
        frac = _aggregate(along, norms, position_weight, eps)
        per_sample.append(1 - frac if sens else frac)
    per_term = masked_mean(torch.stack(per_sample), applies)
    return (weights * per_term).sum(), per_term


def local_loss(inputs: Tensor, logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """RRR-style penalty: squared input gradient of the task loss inside ``mask``.

    Args:
        inputs: ``[B, C, H, W]`` images that require grad (part of the graph of ``logits``).
        logits: ``[B, num_classes]``.
        labels: ``[B]``.
        mask: ``[B, 1 or C, H, W]``; 1 where the gradient should vanish.

    Returns:
        Scalar: the per-sample sum of masked squared gradients, averaged over the batch.
    """
    # Sum (not mean) over the batch: each sample's gradient is then its own, unscaled.
    task = F.cross_entropy(logits, labels, reduction="sum")
    (grad,) = torch.autograd.grad(task, inputs, create_graph=True)
    return (grad * mask).pow(2).sum() / inputs.shape[0]


def foreground_mask(images: Tensor, threshold: float, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """Random sample of foreground pixels (where the cue of colour/texture lives).

    Args:
        images: ``[B, C, H, W]`` un-normalised images in ``[0, 1]``.
        threshold: A pixel is foreground when its max over channels exceeds this.
        fraction: Fraction of foreground pixels kept (the paper sampled foreground pixels).
        generator: Optional RNG for the sample.

    Returns:
        ``[B, 1, H, W]`` float mask.
    """
    fg = images.amax(1, keepdim=True) > threshold
    keep = torch.rand(fg.shape, generator=generator, device=images.device) < fraction
    return (fg & keep).float()


def corner_mask(shape: tuple[int, ...], size: int = 5, device: torch.device | None = None) -> Tensor:
    """The four ``size x size`` corners (where DecoyMNIST puts its patch): ``[B, 1, H, W]``."""
    b, _, h, w = shape
    m = torch.zeros(b, 1, h, w, device=device)
    for ys in (slice(0, size), slice(h - size, h)):
        for xs in (slice(0, size), slice(w - size, w)):
            m[:, :, ys, xs] = 1.0
    return m
