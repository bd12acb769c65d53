"""An on-disk cache of feature tensors keyed by a hash of everything that determines them.

Teacher features and student activations of the concept sets are recomputed only when
something they depend on changed: the images, the model's weights, the layer, the
preprocessing. :func:`fingerprint` hashes any nesting of dicts, lists, scalars, strings and
tensors (by dtype, shape and bytes); modules are hashed through their ``state_dict``.
Files hold plain tensors and load with ``weights_only=True``; they are written atomically
under a lock, and a truncated or corrupt one is reported by name and recomputed.

The folder is capped: :func:`cached_tensors` with ``max_bytes`` (the teacher stage passes
``model.teacher.cache_max_bytes``, default :data:`DEFAULT_MAX_BYTES`) evicts the least
recently used feature files and logs the folder's size. From a shell::

    python -m cdistill.teacher.feature_cache .cache/cdistill --report
    python -m cdistill.teacher.feature_cache .cache/cdistill --evict --max-bytes 500M
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cdistill.errors import CdistillError
from cdistill.utils import build_file, remove_lock_if_free

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


def _load_tensors(path: Path) -> dict[str, Tensor]:
    """Read one cache file; raises on a truncated or corrupt file (then it is recomputed)."""
    out = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(out, dict) or not all(isinstance(v, Tensor) for v in out.values()):
        raise ValueError("not a dict of tensors")
    log.info("feature cache hit: %s", path)
    return dict(out)


def _touch(path: Path) -> None:
    """Record an access in the file's access time (the LRU order of :func:`evict`): set
    explicitly, since ``relatime``/``noatime`` mounts do not update it on every read."""
    with contextlib.suppress(FileNotFoundError):  # evicted by another process meanwhile: no matter
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))


def cached_tensors(
    cache_dir: str | Path | None,
    kind: str,
    key: str,
    compute: Callable[[], dict[str, Tensor]],
    max_bytes: int | None = None,
) -> dict[str, Tensor]:
    """Load ``<cache_dir>/<kind>-<key[:20]>.pt`` if present, else ``compute()`` and store it.

    The file is written under a private temporary name and renamed into place under a lock
    (:func:`cdistill.utils.build_file`): concurrent processes compute it once. A truncated or
    corrupt file is reported by name and recomputed.

    Args:
        cache_dir: Cache folder (``None``: no caching, always compute).
        kind: File prefix (``teacher`` or ``student``).
        key: :func:`fingerprint` of everything ``compute`` depends on.
        compute: Returns ``name -> tensor``.
        max_bytes: After use, evict the least recently used cache files until the folder's
            feature files total at most this (see :func:`evict`); ``None``: no eviction here.
    """
    if cache_dir is None:
        return compute()
    path = Path(cache_dir).expanduser() / f"{kind}-{key[:20]}.pt"

    def build(tmp: Path) -> dict[str, Tensor]:
        out = compute()
        torch.save({k: v.detach().cpu() for k, v in out.items()}, tmp)
        return out

    out = build_file(path, build, _load_tensors, what="feature cache file")
    _touch(path)
    if max_bytes is not None:
        evict(path.parent, max_bytes, keep=(path,))
        log.info("%s", cache_report(path.parent))
    return out


# --------------------------------------------------------------------------- size and eviction


#: Default cap of the feature files in one cache folder (``model.teacher.cache_max_bytes``).
DEFAULT_MAX_BYTES = 2 * 1024**3
#: Temporary files older than this (seconds) belong to a dead process and are removed.
STALE_TMP_S = 24 * 3600


@dataclass(frozen=True)
class CacheReport:
    """Size of a cache folder.

    Attributes:
        folder: The cache folder.
        files, bytes: Feature files (``<kind>-<key>.pt`` at the top level: what :func:`evict` caps).
        other_files, other_bytes: Everything else under the folder (trained teacher weights in
            ``teachers/``, locks, temporary files); never evicted.
    """

    folder: Path
    files: int
    bytes: int
    other_files: int
    other_bytes: int

    def __str__(self) -> str:
        return (f"feature cache {self.folder}: {self.files} feature files, {_mb(self.bytes)}; "
                f"other files {self.other_files}, {_mb(self.other_bytes)}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def feature_files(cache_dir: str | Path) -> list[Path]:
    """The feature files of ``cache_dir`` (top-level ``*.pt``; not ``teachers/``)."""
    folder = Path(cache_dir).expanduser()
    return sorted(p for p in folder.glob("*.pt") if p.is_file()) if folder.is_dir() else []


def cache_report(cache_dir: str | Path) -> CacheReport:
    """Count the files and bytes of ``cache_dir`` (a missing folder reports zeros)."""
    folder = Path(cache_dir).expanduser()
    features = set(feature_files(folder))
    sizes = {p: p.stat().st_size for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}
    feat = sum(v for p, v in sizes.items() if p in features)
    return CacheReport(folder, len(features), feat, len(sizes) - len(features), sum(sizes.values()) - feat)


def _remove_leftovers(folder: Path) -> None:
    """Delete temporary files of writers that died, and locks of files no longer cached."""
    now = time.time()
    for tmp in folder.glob(".*.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()
        except FileNotFoundError:
            pass
    for lock in folder.glob(".*.lock"):
        target = lock.with_name(lock.name[1 : -len(".lock")])
        if not target.exists():
            remove_lock_if_free(target)


def evict(cache_dir: str | Path, max_bytes: int, keep: Iterable[Path] = ()) -> list[Path]:
    """Delete least recently used feature files until they total at most ``max_bytes``.

    Recency is the file's access time, which :func:`cached_tensors` sets on every use.
    Trained teacher weights (``teachers/``) are never evicted.

    Args:
        cache_dir: The cache folder.
        max_bytes: Cap on the feature files' total size (``0``: keep only ``keep``).
        keep: Files never deleted (the one just used).

    Returns:
        The deleted files, oldest first.

    Raises:
        CdistillError: On a negative ``max_bytes``.
    """
    if max_bytes < 0:
        raise CdistillError(f"Feature cache cap max_bytes={max_bytes} must be >= 0 (null in the config: no cap).")
    folder = Path(cache_dir).expanduser()
    keep_set = {Path(p).expanduser() for p in keep}
    stats = []
    for p in feature_files(folder):
        try:
            stats.append((p, p.stat()))
        except FileNotFoundError:  # evicted by another process meanwhile
            continue
    total = sum(st.st_size for _, st in stats)
    removed = []
    for p, st in sorted(stats, key=lambda ps: ps[1].st_atime_ns):
        if total <= max_bytes:
            break
        if p in keep_set:
            continue
        p.unlink(missing_ok=True)
        remove_lock_if_free(p)
        total -= st.st_size
        removed.append(p)
    _remove_leftovers(folder)
    if removed:
        log.info("feature cache %s: evicted %d least recently used files (cap %s)", folder, len(removed), _mb(max_bytes))
    return removed


def _parse_bytes(text: str) -> int:
    """``"2G"``, ``"500M"``, ``"64k"`` or a plain number of bytes."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
    text = text.strip().lower().removesuffix("b")
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(float(text))
    except ValueError:
        raise CdistillError(f"--max-bytes {text!r}: give a number of bytes, e.g. 2000000000 or 2G.") from None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cdistill.teacher.feature_cache [FOLDER] [--report] [--evict --max-bytes 2G]``."""
    parser = argparse.ArgumentParser(
        prog="python -m cdistill.teacher.feature_cache",
        description="Report the size of a feature cache folder, or evict its least recently used files.",
    )
    parser.add_argument("folder", nargs="?", default=".cache/cdistill", help="the cache folder (paths.cache_dir)")
    parser.add_argument("--report", action="store_true", help="print the folder's size (the default)")
    parser.add_argument("--evict", action="store_true", help="delete least recently used feature files")
    parser.add_argument("--max-bytes", default=str(DEFAULT_MAX_BYTES), help="cap for --evict (default 2G)")
    args = parser.parse_args(argv)
    if args.evict:
        removed = evict(args.folder, _parse_bytes(args.max_bytes))
        print(f"evicted {len(removed)} files")
    print(cache_report(args.folder))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
