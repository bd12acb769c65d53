"""RR-ClArC: penalise the output's sensitivity along a bias concept's signal CAV
(docs/methods.md §2.11), as pure functions.

Dreyer, Pahde et al. ("From hope to safety: unlearning biases of deep models via gradient
penalization in latent space", AAAI 2024) model a bias by a CAV ``h`` at a layer ``a`` and add,
while fine-tuning, ``L_RR(x) = (∇_a [m · f(a(x))] · h)²``: ``f`` is the model's output vector (the
logits, before the softmax), ``m`` a mask over the outputs that says whose sensitivity is
penalised (the paper's class-specific correction uses the Kronecker delta ``δ_k`` of the
corrected class ``k``). The term penalises an output that changes when activation is added
or removed along ``h``. And ``h`` is the concept's *signal* (pattern) CAV, the normalised
difference of the mean activations of concept and negative images (the ``mean_diff`` solver),
not the normal of a separating hyperplane: a filter (logistic, SVM) also weighs distractor
directions that happen to separate the two sets, so it can point away from the direction the
concept actually moves the activations.

Here a term's concept has one set per cue value (``color_{y}``), so ``h_{t,k}`` is the signal
CAV of the value that points to class ``k``, and the differentiated output is a logit ``z_k``:

* ``random`` (default): ``k`` drawn uniformly per sample, i.e. ``m = δ_k`` with ``k`` random;
  in expectation every class's logit is desensitized to the cue that points to it, on every
  sample (a digit 3 must not gain class-6 evidence from colour 6);
* ``logit``: ``k = y``, the sample's own class against its own cue (the class-specific form).

Unlike the cosine of §2.4 the squared dot product keeps the gradient's scale: it is 0 only when
the output does not move along ``h``, and it cannot be lowered by enlarging the gradient in
other directions. In ``position`` mode (channel-space CAVs at a conv map) the derivative is the
one of adding ``h`` at every position: ``Σ_p g_p · h``.

In a ReLU network a logit is piecewise linear in the activation, so ``∇_a z_k`` is locally
constant in ``a``: the term's gradient reaches only the layers *after* the concept layer. It
changes how they read ``a`` along ``h``, never what ``a`` holds.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cdistill.errors import CdistillError, NonFiniteError
from cdistill.objective.losses import masked_mean

#: The outputs RR-ClArC differentiates (see the module docstring).
RR_TARGETS = ("random", "logit")
#: The CAV solver of the signal (pattern) CAV: the normalised difference of the two means.
SIGNAL_SOLVER = "mean_diff"


def rr_classes(labels: Tensor, num_classes: int, target: str, generator: torch.Generator | None = None) -> Tensor:
    """The class ``k`` whose logit is differentiated, per sample.

    Args:
        labels: ``[B]`` true classes.
        num_classes: Number of logits.
        target: One of :data:`RR_TARGETS`.
        generator: CPU generator of the ``random`` draws (the task's checkpointed one).

    Returns:
        ``[B]`` long, on ``labels``' device.
    """
    if target == "logit":
        return labels
    if target == "random":
        return torch.randint(0, num_classes, labels.shape, generator=generator).to(labels.device)
    raise CdistillError(f"model.rrclarc.target={target!r}: use one of {RR_TARGETS}.")


def output_gradient(acts: Tensor, logits: Tensor, classes: Tensor) -> Tensor:
    """``∇_a z_k`` per sample, differentiable (one batched ``create_graph`` backward; samples
    do not interact between the layer and the logits).

    Args:
        acts: The layer activation ``[B, ...]`` that ``logits`` were computed from.
        logits: ``[B, num_classes]``.
        classes: ``[B]`` the class ``k`` of each sample (:func:`rr_classes`).

    Returns:
        ``[B, d]`` (the activation's per-sample shape flattened).
    """
    (grad,) = torch.autograd.grad(logits.gather(1, classes[:, None]).sum(), acts, create_graph=True)
    return grad.reshape(grad.shape[0], -1)


def rrclarc_loss(
    grads: Tensor, classes: Tensor, cavs: Tensor, cav_index: Tensor, weights: Tensor
) -> tuple[Tensor, Tensor]:
    """``Σ_t w_t mean_b (g_b · h_{t,k_b})²`` over the samples each term applies to.

    Args:
        grads: ``[B, d]`` output gradients (flatten mode) or ``[B, P, c]`` per position
            (position mode; the directional derivative is summed over positions).
        classes: ``[B]`` the differentiated class ``k`` of each sample.
        cavs: ``[m, d]`` (or ``[m, c]``) signal CAVs (rows of a CAV bank; normalised here).
        cav_index: ``[T, num_classes]`` row of ``cavs`` for term ``t`` and class ``k``, -1
            where the term has no (trusted) CAV for that class.
        weights: ``[T]`` per-term weights (0 leaves a term out, e.g. a sensitize term).

    Returns:
        ``(loss, per_term)``: the scalar and the ``[T]`` unweighted term means.

    Raises:
        NonFiniteError: A gradient holds NaN/Inf (a fault upstream, not a value to penalise).
        CdistillError: The gradient and the CAVs differ in dimension.
    """
    if grads.ndim == 2:
        grads = grads.unsqueeze(1)  # one "position": the flattened map
    bad = ~torch.isfinite(grads.detach()).flatten(1).all(1)
    if bool(bad.any()):
        raise NonFiniteError(
            f"RR-ClArC: the output gradients of {int(bad.sum())} of {len(bad)} samples hold NaN/Inf "
            "(non-finite inputs or activations at the concept layer)"
        )
    if grads.shape[-1] != cavs.shape[-1]:
        raise CdistillError(
            f"Gradient dimension {grads.shape[-1]} does not match signal-CAV dimension {cavs.shape[-1]}: "
            "the CAVs were fitted at another layer (or in another cav_mode)."
        )
    unit = cavs / cavs.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    rows = cav_index[:, classes]  # [T, B]
    per_sample = []
    for t in range(cav_index.shape[0]):
        h = unit[rows[t].clamp_min(0)]  # [B, c]
        per_sample.append(torch.einsum("bpc,bc->b", grads, h).pow(2))
    per_term = masked_mean(torch.stack(per_sample), rows >= 0)
    return (weights * per_term).sum(), per_term
