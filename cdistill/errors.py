"""Clear errors for bad input: name the thing, list close alternatives, say the fix."""

from __future__ import annotations

import difflib
import functools
import os
import sys
from collections.abc import Callable, Iterable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


class CdistillError(ValueError):
    """A user-facing error about bad input or configuration."""


class NonFiniteError(CdistillError):
    """NaN or Inf met in data, activations, gradients or a loss (``model.on_nonfinite``
    decides whether a training batch that meets one stops the run or is skipped)."""


def exit_on_error(task: Callable[P, R]) -> Callable[P, R]:
    """Wrap a console entry point (under ``@hydra.main``) so that a :class:`CdistillError`
    ends the process with its message alone on stderr and exit status 1, not a long
    traceback through Lightning and Hydra. ``HYDRA_FULL_ERROR=1`` re-raises it (full trace),
    as Hydra does for its own errors.
    """

    @functools.wraps(task)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return task(*args, **kwargs)
        except CdistillError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            sys.stderr.write(f"Error: {err}\n(HYDRA_FULL_ERROR=1 for the full trace)\n")
            sys.stderr.flush()
            # SystemExit passes through Hydra's job runner, which only catches Exception.
            sys.exit(1)

    return run


def close_names(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Return up to ``n`` candidates that look like ``name`` (best first).

    Falls back to substring matches, which catch e.g. ``conv1`` -> ``layer1.0.conv1``.
    """
    pool = list(dict.fromkeys(candidates))
    close = difflib.get_close_matches(name, pool, n=n, cutoff=0.5)
    if len(close) < n:
        close += [c for c in pool if name and name in c and c not in close][: n - len(close)]
    return close


def unknown_name(kind: str, name: str, candidates: Iterable[str], fix: str) -> CdistillError:
    """Build the error for an unknown ``kind`` called ``name``.

    Args:
        kind: What was looked up, e.g. ``"layer"`` or ``"student model"``.
        name: The name the user gave.
        candidates: All valid names.
        fix: One sentence telling the user what to change (e.g. the config key).
    """
    pool = list(candidates)
    close = close_names(name, pool)
    hint = f" Close names: {', '.join(close)}." if close else ""
    if not close and len(pool) <= 30:
        hint = f" Valid names: {', '.join(pool)}."
    return CdistillError(f"Unknown {kind} {name!r}.{hint} {fix}")
