"""One entry point that fits any eraser by name, so a config switch compares methods."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from cdistill.erasure.base import LowRankEraser
from cdistill.erasure.clarc import fit_clarc
from cdistill.erasure.inlp import fit_inlp
from cdistill.erasure.leace import LeaceFitter
from cdistill.erasure.rlace import fit_rlace
from cdistill.errors import unknown_name

METHODS = ("leace", "orth", "inlp", "rlace", "p-clarc", "a-clarc")


def fit_eraser(
    method: str, x: Tensor, z: Tensor, num_classes: int | None = None, **kwargs: Any
) -> LowRankEraser:
    """Fit the eraser called ``method`` on features ``x`` ``[N, d]`` and concept ``z``.

    Args:
        method: One of ``leace``, ``orth``, ``inlp``, ``rlace``, ``p-clarc``, ``a-clarc``.
        x: ``[N, d]`` features.
        z: Concept per row. ``leace``/``orth``: integer ids (with ``num_classes``) or
            continuous values; ``inlp``/``rlace``: integer ids; ClArC: binary ids (1 = the
            concept is present).
        num_classes: Class count of integer ``z``.
        **kwargs: Passed to the method (``LeaceFitter``, ``fit_inlp``, ``fit_rlace``,
            ``fit_clarc``).

    Returns:
        A frozen eraser mapping ``[..., d] -> [..., d]``.
    """
    if method in ("leace", "orth"):
        fitter = LeaceFitter(x.shape[-1], num_classes=num_classes, method=method, **kwargs)  # type: ignore[arg-type]
        fitter.update(x, z)
        return fitter.build()
    if method == "inlp":
        return fit_inlp(x, z, num_classes, **kwargs)
    if method == "rlace":
        return fit_rlace(x, z, num_classes, **kwargs)
    if method in ("p-clarc", "a-clarc"):
        present = z.bool()
        return fit_clarc(x[present], x[~present], mode=method[0], **kwargs)  # type: ignore[arg-type]
    raise unknown_name("erasure method", method, METHODS, "Set erasure.method to one of these.")
