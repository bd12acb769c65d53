"""The first pass of the causal basis (:mod:`cdistill.causal.basis`): the unmodified outputs.

One streamed pass over the inputs records, per batch, the model's log-probabilities ``p`` and a
seeded resampling derangement, per layer the float64 moments of its rows (the ``mean`` ablation
value and the spread the optimiser starts from), and whatever each layer's tail replay
(:mod:`cdistill.causal.tail`) reads later.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cdistill.causal.ablation import watch
from cdistill.causal.common import LayerStats, RowMoments, all_reduce_sum, derangement, log_probs
from cdistill.causal.inputs import InputBatches
from cdistill.causal.tail import TailReplay
from cdistill.errors import CdistillError, NonFiniteError


@dataclass
class Reference:
    """The unmodified outputs and the per-batch resampling sources.

    Attributes:
        log_p: Per batch ``[B, K]`` log-probabilities (``[0]`` for an empty batch).
        sources: Per batch ``[B]`` resampling source indices (``resample`` mode).
        total: Inputs over all ranks.
        layers: Layer spec -> what the pass learned about its rows.
    """

    log_p: list[Tensor]
    sources: list[Tensor]
    total: int
    layers: dict[str, LayerStats]

    def device(self) -> torch.device:
        """The device of the first non-empty batch's outputs."""
        return next(lp.device for lp in self.log_p if lp.numel())


def _check_seen(count: int, moments: dict[str, RowMoments]) -> None:
    if count == 0:
        raise CdistillError(
            "No inputs: the tensor or the batches given to extract_causal_bases are empty. "
            "Pass at least one input (on every rank under DDP)."
        )
    for layer, m in moments.items():
        if not m.seen:
            raise CdistillError(
                f"Layer {layer!r} produced no output in a forward pass of the model: it is not "
                "on the forward path. Pick a layer the forward pass runs."
            )


@torch.no_grad()
def reference_pass(
    model: nn.Module,
    layers: Sequence[str],
    batches: InputBatches,
    space: str | None,
    mode: str,
    seed: int,
    replays: dict[str, TailReplay],
) -> Reference:
    """Stream once: unmodified log-probabilities per batch, per-layer row moments and shapes,
    and what each layer's tail replay reads."""
    gen = torch.Generator().manual_seed(seed)
    log_p: list[Tensor] = []
    sources: list[Tensor] = []
    moments = {layer: RowMoments(layer, space) for layer in layers}
    count = 0
    with ExitStack() as stack:
        for layer in layers:
            stack.enter_context(watch(model, layer, moments[layer]))
        for replay in replays.values():
            stack.enter_context(replay.recording())
        for x in batches:
            if x.shape[0] == 0:  # placeholders keep the batch indices aligned
                log_p.append(torch.zeros(0, device=x.device))
                sources.append(torch.zeros(0, dtype=torch.long, device=x.device))
                for replay in replays.values():
                    replay.record(None)
                continue
            lp = log_probs(model(x))
            for replay in replays.values():
                replay.record(x)
            if not bool(torch.isfinite(lp).all()):
                raise NonFiniteError(
                    "Non-finite model outputs (NaN/Inf) on the unmodified inputs: the causal "
                    "energy is undefined. Check the inputs and the model's weights."
                )
            log_p.append(lp)
            sources.append(derangement(x.shape[0], gen).to(x.device))
            count += x.shape[0]
    _check_seen(count, moments)
    device = next(lp.device for lp in log_p if lp.numel())
    total = int(all_reduce_sum(torch.tensor([float(count)], device=device)).item())
    return Reference(log_p, sources, total, {layer: m.stats(mode) for layer, m in moments.items()})
