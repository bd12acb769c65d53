"""Generated data built atomically: privately, renamed into place under a lock, checked on load.

Two runs may need the same generated data at once (a drawn dataset, trained teacher weights,
cached features), and a run may be killed while it writes. These helpers make sure that no
reader ever uses a partial result:

* :func:`build_folder` builds a folder in a private temporary sibling, writes a manifest
  (:data:`MANIFEST`: the file count, every file's relative path and size, and a SHA-256 over
  them) and renames the folder into place while it holds an exclusive ``fcntl`` lock. Every
  load checks the manifest (``stat`` calls only, cheap enough for every run); a folder that
  fails the check is rebuilt, with a warning naming it and what is wrong.
* :func:`build_file` does the same for one file: written under a private temporary name and
  renamed into place under the lock. A file that the caller's loader cannot read (truncated,
  corrupt) is reported by name and rebuilt.

Locks are ``fcntl.flock`` locks on a hidden sibling file ``.<name>.lock`` (Linux/POSIX). A
process that dies releases its lock, and its temporary folder is removed by the next builder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from cdistill.errors import CdistillError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Name of the manifest file inside a folder built by :func:`build_folder`.
MANIFEST = ".manifest.json"
#: What a loader raises on a truncated or corrupt file (``torch.load``, ``json``, ``pickle``).
UNREADABLE: tuple[type[BaseException], ...] = (
    RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile,
)


def lock_path(target: Path) -> Path:
    """The lock file of ``target``: ``.<name>.lock`` next to it."""
    return target.with_name(f".{target.name}.lock")


@contextmanager
def exclusive_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` (blocks until no other process holds it)."""
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:  # "a+": create without truncating another process's file
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def remove_lock_if_free(target: Path) -> bool:
    """Delete ``target``'s lock file when no process holds it; return whether it was deleted.

    A process that opened the file just before the deletion locks an orphaned file; that only
    costs duplicate work, never a partial result (writes are atomic renames).
    """
    path = lock_path(target)
    try:
        with open(path, "rb") as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            path.unlink(missing_ok=True)
            return True
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------- folders


def _listing(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``folder`` except the manifest, sorted."""
    rows = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
    rows.pop(MANIFEST, None)
    return dict(sorted(rows.items()))


def _digest(listing: Mapping[str, int]) -> str:
    h = hashlib.sha256()
    for name, size in listing.items():
        h.update(f"{name}\0{size}\n".encode())
    return h.hexdigest()


def _jsonable(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` as it reads back from JSON (so that a saved and a fresh one compare equal)."""
    return dict(json.loads(json.dumps(dict(meta), sort_keys=True)))


def write_manifest(folder: Path, meta: Mapping[str, Any]) -> None:
    """Write :data:`MANIFEST` for the files now under ``folder``, with ``meta`` (what the
    contents are a function of, e.g. a settings hash)."""
    listing = _listing(folder)
    manifest = {"files": len(listing), "digest": _digest(listing), "meta": _jsonable(meta), "sizes": listing}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _difference(saved: Mapping[str, int], now: Mapping[str, int]) -> str:
    """The first few files missing, changed or extra, for the log."""
    missing = [k for k in saved if k not in now]
    changed = [k for k in saved if k in now and saved[k] != now[k]]
    extra = [k for k in now if k not in saved]
    parts = [f"{label} {len(names)} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
             for label, names in (("missing", missing), ("size changed", changed), ("unlisted", extra)) if names]
    return "; ".join(parts)


def check_folder(folder: Path, meta: Mapping[str, Any]) -> str | None:
    """Check ``folder`` against its manifest.

    Args:
        folder: A folder written by :func:`build_folder`.
        meta: What its contents must be a function of (compared with the manifest's).

    Returns:
        ``None`` when the folder is complete and built for ``meta``, else what is wrong.
    """
    if not folder.is_dir():
        return "missing"
    try:
        saved = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST} (partial or written by an older version)"
    except UNREADABLE as err:
        return f"unreadable {MANIFEST} ({err})"
    if not isinstance(saved, dict) or saved.get("meta") != _jsonable(meta):
        return "built for other settings"
    now = _listing(folder)
    if len(now) != saved.get("files") or _digest(now) != saved.get("digest"):
        detail = _difference(saved.get("sizes") or {}, now)
        return f"{len(now)} files where the manifest lists {saved.get('files')}" + (f": {detail}" if detail else "")
    return None


def _remove_leftovers(target: Path) -> None:
    """Delete temporary folders of builds of ``target`` that died (call with the lock held:
    no other build of ``target`` is running then)."""
    for pattern in (f".{target.name}.tmp-*", f".{target.name}.old-*"):
        for path in target.parent.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


def _swap_in(built: Path, target: Path) -> None:
    """Rename ``built`` to ``target``, moving an existing ``target`` out of the way first."""
    if target.exists() or target.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(old / target.name)
        built.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        built.rename(target)


def build_folder(target: str | Path, build: Callable[[Path], None], meta: Mapping[str, Any]) -> Path:
    """Make sure ``target`` holds a complete build for ``meta``; build it when it does not.

    The check runs on every call; when it fails, the lock is taken, the check repeated
    (another process may just have built it), and ``build`` writes into a private temporary
    folder that is renamed to ``target`` once complete and listed in its manifest.

    Args:
        target: The folder (its parent is created).
        build: Writes the contents into the empty folder it is given.
        meta: JSON-able description of what the contents are a function of; a folder built
            for other ``meta`` is rebuilt.

    Returns:
        ``target`` as a :class:`~pathlib.Path`.
    """
    target = Path(target).expanduser()
    if check_folder(target, meta) is None:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target):
        problem = check_folder(target, meta)
        if problem is None:
            return target
        if problem != "missing":
            log.warning("%s is incomplete or stale (%s): rebuilding it", target, problem)
        _remove_leftovers(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            write_manifest(tmp, meta)
            _swap_in(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# --------------------------------------------------------------------------- single files


def _try_load(path: Path, load: Callable[[Path], T], what: str, report: bool) -> tuple[T] | None:
    """``(load(path),)``, or ``None`` when the file is missing or unreadable (then, with
    ``report``, a warning names the file and the error)."""
    if not path.is_file():
        return None
    try:
        return (load(path),)
    except FileNotFoundError:  # removed between the check and the read (cache eviction)
        return None
    except CdistillError:
        raise
    except UNREADABLE as err:
        if report:
            log.warning("%s %s is unreadable (%s: %s); rebuilding it", what, path, type(err).__name__, err)
        return None


def build_file(target: str | Path, build: Callable[[Path], T], load: Callable[[Path], T], what: str = "file") -> T:
    """Load ``target``, or build it atomically when it is missing or unreadable.

    Args:
        target: The file (its parent is created).
        build: Writes the file at the temporary path it is given and returns its value.
        load: Reads the file; raises (one of :data:`UNREADABLE`) when it is truncated or corrupt.
        what: What the file is, for the warning (e.g. ``"feature cache file"``).

    Returns:
        The loaded or built value.
    """
    target = Path(target).expanduser()
    found = _try_load(target, load, what, report=False)
    if found is not None:
        return found[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target):
        found = _try_load(target, load, what, report=True)
        if found is not None:
            return found[0]
        tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            value = build(tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return value


__all__ = [
    "MANIFEST",
    "UNREADABLE",
    "build_file",
    "build_folder",
    "check_folder",
    "exclusive_lock",
    "lock_path",
    "remove_lock_if_free",
    "write_manifest",
]
