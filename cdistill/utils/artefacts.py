"""Make fitted artefacts (CAV banks, index buffers) identical on every DDP rank.

Artefacts are fitted on each rank at fit start; rank 0's values are then broadcast, so that
every rank holds the same buffers bitwise (docs/methods.md §7) even if fitting is not
bitwise reproducible across processes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # utils sits below concepts: the bank is only a type here
    from cdistill.concepts.cav import CAVBank


def broadcast_buffers(trainer: Any, owners: Iterable[tuple[nn.Module, str]], device: torch.device) -> None:
    """Replace each ``getattr(owner, name)`` by rank 0's value (no-op without DDP).

    Args:
        trainer: The Lightning trainer (or None).
        owners: ``(module, buffer name)`` pairs.
        device: Where the broadcast values go.
    """
    if trainer is None or trainer.world_size <= 1:
        return
    for owner, name in owners:
        value = trainer.strategy.broadcast(getattr(owner, name).cpu(), src=0)
        setattr(owner, name, value.to(device))


def broadcast_bank(trainer: Any, bank: CAVBank, device: torch.device) -> None:
    """Give every rank rank 0's CAV bank: buffers and metadata (no-op without DDP)."""
    if trainer is None or trainer.world_size <= 1:
        return
    broadcast_buffers(trainer, ((bank, "vectors"), (bank, "biases"), (bank, "accuracies")), device)
    bank.set_extra_state(trainer.strategy.broadcast(bank.get_extra_state(), src=0))
