"""An on-disk cache of feature tensors keyed by a hash of everything that determines them.

Teacher features and student activations of the concept sets are recomputed only when
something they depend on changed: the images, the model's weights, the layer, the
preprocessing. :func:`fingerprint` hashes any nesting of dicts, lists, scalars, strings and
tensors (by dtype, shape and bytes); modules are hashed through their ``state_dict``.
Files hold plain tensors and load with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, Mapping):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(repr(k).encode())
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, list | tuple):
        h.update(b"[")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    else:
        h.update(repr(obj).encode())


def fingerprint(*parts: Any) -> str:
    """Hex SHA-256 of ``parts`` (see the module docstring for what is hashed)."""
    h = hashlib.sha256()
    for p in parts:
        _feed(h, p)
    return h.hexdigest()


def cached_tensors(
    cache_dir: str | Path | None, kind: str, key: str, compute: Callable[[], dict[str, Tensor]]
) -> dict[str, Tensor]:
    """Load ``<cache_dir>/<kind>-<key[:20]>.pt`` if present, else ``compute()`` and store it.

    Args:
        cache_dir: Cache folder (``None``: no caching, always compute).
        kind: File prefix (``teacher`` or ``student``).
        key: :func:`fingerprint` of everything ``compute`` depends on.
        compute: Returns ``name -> tensor``.
    """
    if cache_dir is None:
        return compute()
    path = Path(cache_dir).expanduser() / f"{kind}-{key[:20]}.pt"
    if path.is_file():
        log.info("feature cache hit: %s", path)
        return dict(torch.load(path, map_location="cpu", weights_only=True))
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")  # atomic: DDP ranks may write the same key
    torch.save({k: v.detach().cpu() for k, v in out.items()}, tmp)
    os.replace(tmp, path)
    return out
