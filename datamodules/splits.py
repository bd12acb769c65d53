"""Deterministic seeds and stratified splits.

Every random choice in the datamodules comes from a ``torch.Generator`` seeded through
:func:`derive_seed`, so two processes (e.g. DDP ranks) with the same ``seed`` build
bitwise identical data without communicating.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor

from cdistill.errors import CdistillError

T = TypeVar("T")


def derive_seed(seed: int, *tags: str) -> int:
    """Mix ``seed`` with string tags into a 63-bit seed.

    Python's ``hash()`` is salted per process, so a cryptographic hash is used instead:
    the result is the same on every machine and every run.

    Args:
        seed: The user's seed.
        tags: What the randomness is for, e.g. ``("cues", "test")``.
    """
    text = ":".join([str(int(seed)), *tags]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") & (2**63 - 1)


def make_generator(seed: int, *tags: str) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`derive_seed` of the arguments."""
    return torch.Generator().manual_seed(derive_seed(seed, *tags))


def seeded_subset(items: Sequence[T], keep: int, seed: int, *tags: str) -> list[T]:
    """``keep`` of ``items`` (all of them when ``keep >= len(items)``), drawn by one permutation
    from :func:`make_generator` of ``(seed, *tags)`` and kept in their original order."""
    order = torch.randperm(len(items), generator=make_generator(seed, *tags))
    return [items[i] for i in sorted(order[:keep].tolist())]


def check_fractions(fractions: dict[str, float]) -> None:
    """Reject fractions outside ``[0, 1)`` or summing to 1 or more (no room for train).

    Raises:
        CdistillError: Naming the offending setting.
    """
    for name, frac in fractions.items():
        if not 0.0 <= frac < 1.0:
            raise CdistillError(f"data.{name}={frac} must be in [0, 1).")
    total = sum(fractions.values())
    if total >= 1.0:
        listed = ", ".join(f"{k}={v}" for k, v in fractions.items())
        raise CdistillError(
            f"Split fractions sum to {total:.3f} ({listed}); they must leave room for the "
            "train split (sum < 1). Lower one of them."
        )


def stratified_split(
    labels: Tensor, fractions: dict[str, float], generator: torch.Generator, rest: str = "train"
) -> dict[str, Tensor]:
    """Split sample indices per class with a seeded shuffle.

    Within each class the indices are shuffled and cut into ``round(n_c * fraction)``
    pieces in the order of ``fractions``; what remains goes to ``rest``. Each split's
    indices are then shuffled again, so taking a prefix (e.g. to cap the train split)
    keeps the classes roughly balanced.

    Args:
        labels: ``int64 [N]`` class labels.
        fractions: Split name -> fraction of each class, e.g. ``{"val": 0.1}``.
        generator: Source of randomness.
        rest: Name of the split that receives the remainder.

    Returns:
        Split name -> ``int64 [n_split]`` indices into ``labels``; disjoint, covering all.
    """
    check_fractions(fractions)
    parts: dict[str, list[Tensor]] = {name: [] for name in [*fractions, rest]}
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        start = 0
        for name, frac in fractions.items():
            count = round(idx.numel() * frac)
            parts[name].append(idx[start : start + count])
            start += count
        parts[rest].append(idx[start:])
    out: dict[str, Tensor] = {}
    for name, chunks in parts.items():
        joined = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)
        out[name] = joined[torch.randperm(joined.numel(), generator=generator)]
    return out
