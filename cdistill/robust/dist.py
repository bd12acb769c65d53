"""The two collectives the group-robust tasks need, as no-ops outside ``torch.distributed``."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 outside DDP)."""
    return dist.get_world_size() if _active() else 1


def all_sum(x: Tensor) -> Tensor:
    """The sum of ``x`` over all processes (a detached copy; ``x`` itself outside DDP)."""
    if not _active():
        return x.detach()
    out = x.detach().clone()
    dist.all_reduce(out)
    return out


def all_cat(x: Tensor) -> Tensor:
    """``x [n, ...]`` of every process concatenated in rank order (every rank's ``n`` equal)."""
    if not _active():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts)
