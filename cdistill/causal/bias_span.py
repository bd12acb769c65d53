"""The bias's LEACE subspace at a layer, from labelled inputs (docs/methods.md §5).

The reliance measures ablate a *concept subspace*. One choice is the span of the bias term's
CAVs, fitted on concept images; that span holds how the cue looks in isolation, which need not
be how the model carries it on real inputs. The other choice is the subspace a LEACE eraser of
the bias would edit, fitted on real inputs with their bias labels.

LEACE (Belrose et al. 2023) edits ``x ↦ x − P (x − μ)`` with ``P = W⁺ U Uᵀ W``, ``W`` a whitening
of ``Σ_xx`` and ``U`` the left singular vectors of ``W Σ_xz``. The edit moves ``x`` only inside
the range of ``P``, which is ``W⁺ · range(W Σ_xz) = range(Σ_xz)``: the span of the
cross-covariance between the rows and the one-hot bias. So that span is the eraser's subspace,
and it is found without the ``d × d`` covariance (a flattened map has ``d`` in the tens of
thousands). Mean-ablating it orthogonally (:func:`cdistill.causal.concept_ablation`) also leaves
``Cov(x', z) = (I − P_S) Σ_xz = 0``: no linear read-out of the bias is left; LEACE's oblique
edit reaches the same guarantee with a smaller change.

On real data the bias is correlated with the label (that is the bias), so ``Σ_xz`` would also
hold the class directions, and ablating those changes any model's output. The statistics are
therefore **group-balanced**: every (class, bias value) group gets the same weight, which makes
the bias independent of the label. Under that weighting the columns of ``Σ_xz`` are
``(μ_b − μ) / B`` with ``μ_b`` the mean over classes of the group means ``μ_{y,b}`` and ``μ``
their mean over ``b``: only classes in which every bias value occurs are used, so each ``μ_b``
averages the same classes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from cdistill.causal.ablation import check_space, default_space, to_rows, watch
from cdistill.causal.common import all_reduce_sum, model_device
from cdistill.causal.intervention import unpack_batch
from cdistill.causal.subspace import orthonormal_span
from cdistill.errors import CdistillError
from cdistill.utils.capture import eval_mode, resolve_module


class BiasSpanFitter:
    """Streams per-(class, bias value) sums of rows; :meth:`span` gives the bias's LEACE subspace.

    Args:
        dim: Row size ``d``.
        num_classes: ``K``; labels lie in ``[0, K)``.
        num_bias: ``B``; bias values lie in ``[0, B)`` (a negative value, "unknown", is skipped).
    """

    def __init__(self, dim: int, num_classes: int, num_bias: int) -> None:
        if num_classes < 1 or num_bias < 2:
            raise CdistillError(
                f"The bias subspace needs >= 1 class and >= 2 bias values; got {num_classes} and {num_bias}."
            )
        self.sums = torch.zeros(num_classes, num_bias, dim, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, num_bias, dtype=torch.float64)

    def update(self, rows: Tensor, label: Tensor, bias: Tensor) -> None:
        """Add rows ``[N, d]`` (or ``[N, P, d]``: ``P`` positions of each input, all with its
        label and bias) of inputs with labels ``[N]`` and bias values ``[N]``.

        Raises:
            CdistillError: A label or bias value outside the declared range.
        """
        rows = rows.detach().double().cpu()
        rows = rows.reshape(rows.shape[0], -1, rows.shape[-1])
        label, bias = label.long().cpu(), bias.long().cpu()
        k, b, _ = self.sums.shape
        if bool(((label < 0) | (label >= k)).any()) or bool((bias >= b).any()):
            raise CdistillError(
                f"A label lies outside [0, {k}) or a bias value outside [0, {b}) (labels {label.unique().tolist()}, "
                f"bias {bias.unique().tolist()}): pass num_classes and num_bias that cover the data."
            )
        keep = bias >= 0
        group = label[keep] * b + bias[keep]
        per_input = rows[keep].sum(1)  # [n, d]: all positions of an input share its group
        self.sums.view(k * b, -1).index_add_(0, group, per_input)
        self.counts.view(-1).index_add_(0, group, torch.full((len(group),), float(rows.shape[1]), dtype=torch.float64))

    def all_reduce_(self) -> BiasSpanFitter:
        """Sum the statistics across DDP ranks (a no-op without DDP); returns ``self``."""
        all_reduce_sum(self.sums)
        all_reduce_sum(self.counts)
        return self

    def complete_classes(self) -> Tensor:
        """``[K]`` mask of the classes in which every bias value occurs."""
        return (self.counts > 0).all(1)

    def cross_covariance(self) -> Tensor:
        """``[d, B]`` group-balanced cross-covariance of the rows with the one-hot bias.

        Raises:
            CdistillError: No class holds every bias value.
        """
        full = self.complete_classes()
        if not bool(full.any()):
            seen = int((self.counts.sum(0) > 0).sum())
            raise CdistillError(
                f"No class has inputs with every bias value ({self.counts.shape[1]} values, {seen} seen), so the "
                "bias cannot be told apart from the class. Fit on a split where the bias varies within classes "
                "(e.g. a held-out split with a random cue, or val and val_reversed together)."
            )
        means = self.sums[full] / self.counts[full].unsqueeze(-1)  # [K', B, d] group means
        per_bias = means.mean(0)  # [B, d]: each bias value over the same classes
        return ((per_bias - per_bias.mean(0)) / per_bias.shape[0]).T

    def span(self) -> Tensor:
        """``[d, r]`` orthonormal basis of the bias's LEACE subspace, ``r <= B − 1``.

        Raises:
            CdistillError: No complete class, or the rows carry no linear trace of the bias.
        """
        return orthonormal_span(self.cross_covariance(), "bias's LEACE subspace")


class _Reader:
    """The hook's side of :func:`bias_leace_span`: adds each batch's rows with its labels."""

    def __init__(self, space: str | None, num_classes: int, num_bias: int) -> None:
        self.space, self.num_classes, self.num_bias = space, num_classes, num_bias
        self.fitter: BiasSpanFitter | None = None
        self.label = self.bias = torch.zeros(0)

    def __call__(self, act: Tensor) -> None:
        if self.space is None:
            self.space = default_space(act)
        rows = to_rows(act.detach(), self.space)
        if self.fitter is None:
            self.fitter = BiasSpanFitter(rows.shape[-1], self.num_classes, self.num_bias)
        self.fitter.update(rows, self.label, self.bias)


@torch.no_grad()
def bias_leace_span(
    model: nn.Module,
    layer: str,
    data: Dataset[Any] | Iterable[Any],
    *,
    num_classes: int,
    num_bias: int,
    space: str | None = None,
    batch_size: int = 256,
) -> tuple[Tensor, str]:
    """The bias's LEACE subspace at ``layer`` (see the module docstring), in one streamed pass.

    Args:
        model: The model (run in eval mode on its device, modes restored).
        layer: Module path (``"path:i"``: element ``i`` of a tuple output).
        data: A Dataset or re-iterable batches with ``image``, ``label`` and ``bias`` (as
            :func:`cdistill.causal.concept_ablation` takes them).
        num_classes: ``K``.
        num_bias: ``B``, the number of bias values.
        space: ``position`` or ``flatten``; ``None``: ``position`` for maps, ``flatten`` for vectors.
        batch_size: Samples per batch when ``data`` is a Dataset.

    Returns:
        ``(basis [d, r] float64 orthonormal, space)``.

    Raises:
        CdistillError: An unknown layer or space, batches without ``bias``, no inputs, no class
            holding every bias value, or no linear trace of the bias at the layer.
    """
    check_space(space)
    resolve_module(model, layer)
    reader = _Reader(space, num_classes, num_bias)
    device = model_device(model)
    with eval_mode(model), watch(model, layer, reader):
        # One pass, so a one-shot iterator of batches is fine too.
        for batch in DataLoader(data, batch_size=batch_size, shuffle=False) if isinstance(data, Dataset) else data:
            x, label, bias = unpack_batch(batch)
            if bias is None:
                raise CdistillError("The bias subspace needs the bias of every input: batches without 'bias' were given.")
            if len(x):
                reader.label, reader.bias = label, torch.as_tensor(bias)
                model(x.to(device))
    if reader.fitter is None or reader.space is None:
        raise CdistillError(f"No inputs reached layer {layer!r}: pass at least one input and a layer the forward pass runs.")
    return reader.fitter.all_reduce_().span(), reader.space
