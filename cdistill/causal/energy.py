"""The objective of the causal basis (:mod:`cdistill.causal.basis`): the ablation energy.

The energy of a unit direction ``v`` at a layer is the mean over all inputs (and DDP ranks) of
``KL(p || q)``, ``p`` the unmodified output distribution (:class:`~cdistill.causal.reference.Reference`)
and ``q`` the one after ablating ``v`` (:mod:`cdistill.causal.ablation`). Each evaluation streams
the batches, back-propagating each batch's share of the loss before the next one runs; with a
tail replay (:mod:`cdistill.causal.tail`) only the part of the model after the layer runs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdistill.causal.ablation import Ablation
from cdistill.causal.common import all_reduce_sum, log_probs
from cdistill.causal.inputs import InputBatches
from cdistill.causal.reference import Reference
from cdistill.causal.tail import TailReplay
from cdistill.errors import CdistillError, NonFiniteError


@dataclass(eq=False)
class Energy:
    """The energy objective of one layer: negative mean KL as a function of ``u``.

    Attributes:
        model: The classifier (patched by :func:`~cdistill.causal.ablation.ablate` when
            ``replay`` is ``None``).
        layer: The layer spec.
        batches: The inputs (read only without a replay).
        ref: The first pass's outputs and resampling sources.
        ablation: The ablation whose direction each evaluation sets.
        replay: The layer's tail replay, or ``None`` for the whole model.
        scale: The current vector's loss scale (set by its first evaluation).
        floor: The least loss scale of the current vector.
    """

    model: nn.Module
    layer: str
    batches: InputBatches
    ref: Reference
    ablation: Ablation
    replay: TailReplay | None
    scale: float | None = None
    floor: float = 0.0

    def start(self, floor: float) -> None:
        """Begin a new vector: the next evaluation fixes the loss scale, at least ``floor``."""
        self.scale, self.floor = None, floor

    @staticmethod
    def direction(u: Tensor, basis: Tensor) -> Tensor:
        """``u`` projected away from the columns of ``basis [d, j]`` and normalised -> ``[d]``."""
        w = u - basis @ (basis.T @ u) if basis.shape[1] else u
        return w / w.norm()

    def _nonempty(self) -> Iterator[tuple[int, Tensor | None]]:
        """``(b, x)`` per non-empty batch; ``x`` is ``None`` with a tail replay (not needed)."""
        if self.replay is not None:
            replay = self.replay
            yield from ((b, None) for b in range(replay.batches) if replay.recorded(b))
        else:
            yield from ((b, x) for b, x in enumerate(self.batches) if x.shape[0])

    def _batch_kl(self, b: int, x: Tensor | None, v: Tensor) -> Tensor:
        self.ablation.direction = v
        self.ablation.source = self.ref.sources[b]
        if self.replay is not None:
            output = self.replay(b, self.ablation)  # the part after the layer, on its cached output
        else:
            assert x is not None
            output = self.model(x)  # the whole model; the hook of ablate() edits the layer
        log_q = log_probs(output)
        kl = F.kl_div(log_q, self.ref.log_p[b], reduction="sum", log_target=True)
        return kl / self.ref.total

    def loss_and_grad(self, u: Tensor, basis: Tensor, j: int) -> Tensor:
        """Negative energy at ``u``, divided by the vector's loss scale; fills ``u.grad``.

        The scale (the energy at the starting point, at least the floor) makes L-BFGS's
        absolute tolerances relative: a network whose energies are all ~1e-5 would otherwise
        stop after one iteration.
        """
        u.grad = torch.zeros_like(u)
        total = torch.zeros((), dtype=u.dtype, device=u.device)
        with torch.enable_grad():
            for b, x in self._nonempty():
                loss = -self._batch_kl(b, x, self.direction(u, basis))
                if not loss.requires_grad:
                    raise CdistillError(
                        f"The model's output does not depend differentiably on layer "
                        f"{self.layer!r} (no gradient reaches the ablated direction). Pick a "
                        "layer on the differentiable path to the logits."
                    )
                loss.backward()
                total += loss.detach()
        all_reduce_sum(u.grad)
        all_reduce_sum(total)
        if not (bool(torch.isfinite(total)) and bool(torch.isfinite(u.grad).all())):
            raise NonFiniteError(
                f"Non-finite energy or gradient at layer {self.layer!r}, vector {j + 1}: the "
                "ablated forward produced NaN/Inf. Check the model for overflow (e.g. run it "
                "in float32) or pick another layer."
            )
        if self.scale is None:
            start = abs(float(total))
            self.scale = max(start, self.floor) if max(start, self.floor) > 0 else 1.0
        u.grad /= self.scale
        return total / self.scale

    @torch.no_grad()
    def energy(self, v: Tensor) -> Tensor:
        """Mean KL over all inputs (and ranks) of ablating the unit direction ``v [d]``."""
        total = torch.zeros((), dtype=v.dtype, device=v.device)
        for b, x in self._nonempty():
            total += self._batch_kl(b, x, v)
        return all_reduce_sum(total)
