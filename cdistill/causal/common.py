"""What the causal basis (:mod:`cdistill.causal.basis`) and the reliance measures
(:mod:`cdistill.causal.reliance`) both need: the model's output as log-probabilities, its device,
the working dtype, seeded derangements for ``resample`` ablation, sums across DDP ranks, and the
streaming float64 moments of a layer's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cdistill.causal.ablation import default_space, to_rows
from cdistill.errors import CdistillError


def distributed() -> bool:
    """Whether ``torch.distributed`` is initialised (DDP)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` in place across the DDP ranks (a no-op without DDP); returns ``t``."""
    if distributed():
        dist.all_reduce(t)
    return t


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with none)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision tensors, the tensor's own dtype otherwise."""
    return torch.promote_types(dtype, torch.float32)


def logits_of(output: Any) -> Tensor:
    """The logits ``[B, K]`` of a model output: a tensor, or an object with a ``.logits`` tensor."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise CdistillError(
        f"The model returned {type(output).__name__}; the causal basis needs logits [B, K] "
        "(a tensor, or an object with a .logits tensor). Wrap the model to return them."
    )


def log_probs(output: Any) -> Tensor:
    """Log-softmax ``[B, K]`` of a model output's logits, in the working dtype."""
    logits = logits_of(output)
    return F.log_softmax(logits.to(work_dtype(logits.dtype)).reshape(logits.shape[0], -1), dim=-1)


def derangement(n: int, gen: torch.Generator) -> Tensor:
    """``[n]`` source indices with no fixed point: sample ``order[j]`` takes ``order[j-1]``."""
    order = torch.randperm(n, generator=gen)
    source = torch.empty_like(order)
    source[order] = order.roll(1)
    return source


@dataclass
class LayerStats:
    """What a first pass over the inputs learned about one layer.

    Attributes:
        space: ``position`` or ``flatten``.
        dim: Row size ``d``.
        dtype: Working dtype (:func:`work_dtype` of the layer's output).
        mean: ``[d]`` mean row over all inputs (and positions), working dtype.
        spread: ``[d]`` mean squared distance of each coordinate from its ablated value ``r``.
    """

    space: str
    dim: int
    dtype: torch.dtype
    mean: Tensor
    spread: Tensor


class RowMoments:
    """Streaming float64 sums of one layer's rows and their squares (read at hook time; see
    :func:`cdistill.causal.ablation.watch`)."""

    def __init__(self, layer: str, space: str | None) -> None:
        self.layer = layer
        self.space = space
        self.dtype = torch.float32
        self.sum: Tensor | None = None
        self.squares: Tensor | None = None
        self.rows = 0
        self.seen = False

    def __call__(self, act: Tensor) -> None:
        self.seen = True
        if self.space is None:
            self.space = default_space(act)
        self.dtype = act.dtype
        rows = to_rows(act.detach(), self.space)
        rows = rows.reshape(-1, rows.shape[-1]).double()
        if self.sum is None or self.squares is None:
            self.sum, self.squares = rows.sum(0), rows.pow(2).sum(0)
        elif self.sum.shape[0] != rows.shape[1]:
            raise CdistillError(
                f"Layer {self.layer!r} changed its row size between batches "
                f"({self.sum.shape[0]} -> {rows.shape[1]}) in {self.space!r} space: give "
                "inputs of one size, or use position space."
            )
        else:
            self.sum += rows.sum(0)
            self.squares += rows.pow(2).sum(0)
        self.rows += rows.shape[0]

    def stats(self, mode: str) -> LayerStats:
        """Reduce across ranks; the spread is the mean squared distance from ``r``."""
        assert self.sum is not None and self.squares is not None and self.space is not None
        n = self.sum.new_tensor([float(self.rows)])
        packed = all_reduce_sum(torch.cat([self.sum, self.squares, n]))
        dim = self.sum.shape[0]
        mean, second = packed[:dim] / packed[-1], packed[dim:-1] / packed[-1]
        spread = second if mode == "zero" else (second - mean.pow(2)).clamp_min(0)
        work = work_dtype(self.dtype)
        return LayerStats(self.space, dim, work, mean.to(work), spread.to(work))
