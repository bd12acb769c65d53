"""ClArC projections along a concept activation vector (Anders et al. 2022).

Both variants move every sample's coordinate along the unit CAV v to a fixed anchor value
and leave the orthogonal complement alone:

    r(x) = x - v v^T (x - anchor)

* **P-ClArC** (projective): anchor = mean of the *reference* (concept-free) activations, so
  the concept is projected out ("as if the artifact were absent").
* **A-ClArC** (augmentative): anchor = mean of the *concept* activations, so the concept is
  added to every sample ("as if the artifact were present"), the form used during
  fine-tuning to make a model insensitive to it.

Only ``v^T anchor`` matters; it is stored as the bias of a rank-1 :class:`LowRankEraser`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from cdistill.erasure.base import LowRankEraser, check_finite
from cdistill.errors import CdistillError

ClarcMode = Literal["p", "a"]


def clarc_eraser(cav: Tensor, anchor: Tensor, mode: ClarcMode = "p") -> LowRankEraser:
    """The ClArC eraser for a given direction and anchor point.

    Args:
        cav: ``[d]`` concept direction (normalised here).
        anchor: ``[d]`` point whose coordinate along the CAV every sample is moved to.
        mode: ``"p"`` or ``"a"`` (only sets the method name; the anchor decides the effect).

    Returns:
        Rank-1 :class:`LowRankEraser` with ``proj_left == proj_right == v``.
    """
    if cav.ndim != 1 or anchor.shape != cav.shape:
        raise CdistillError(
            f"cav and anchor must both be [d]; got {tuple(cav.shape)}, {tuple(anchor.shape)}."
        )
    check_finite("cav", cav)
    norm = float(cav.norm())
    if norm == 0.0:
        raise CdistillError("The CAV is the zero vector; fit it on separable concept data.")
    v = (cav.to(torch.float64) / norm)[:, None]
    return LowRankEraser(v, v, anchor.to(torch.float64), method=f"{mode}-clarc")


def fit_clarc(
    x_concept: Tensor,
    x_reference: Tensor,
    *,
    cav: Tensor | None = None,
    mode: ClarcMode = "p",
) -> LowRankEraser:
    """Fit P-ClArC or A-ClArC from activations of concept and reference samples.

    Args:
        x_concept: ``[Nc, d]`` activations of samples showing the concept.
        x_reference: ``[Nr, d]`` activations of samples without it.
        cav: ``[d]`` concept direction (e.g. from a fitted CAV); defaults to the difference
            of the two means (pointing towards the concept).
        mode: ``"p"`` (anchor = reference mean, removes the concept) or ``"a"`` (anchor =
            concept mean, adds it).

    Returns:
        Rank-1 :class:`LowRankEraser`.
    """
    if mode not in ("p", "a"):
        raise CdistillError(
            f"Unknown ClArC mode {mode!r}; use 'p' (projective) or 'a' (augmentative)."
        )
    if x_concept.ndim != 2 or x_reference.ndim != 2 or x_concept.shape[1] != x_reference.shape[1]:
        raise CdistillError(
            "x_concept and x_reference must be [N, d] with the same d; got "
            f"{tuple(x_concept.shape)} and {tuple(x_reference.shape)}."
        )
    if len(x_concept) == 0 or len(x_reference) == 0:
        raise CdistillError("ClArC needs at least one concept and one reference sample.")
    check_finite("x_concept", x_concept)
    check_finite("x_reference", x_reference)
    mu_c = x_concept.to(torch.float64).mean(0)
    mu_r = x_reference.to(torch.float64).mean(0)
    direction = mu_c - mu_r if cav is None else cav.to(torch.float64)
    return clarc_eraser(direction, mu_r if mode == "p" else mu_c, mode)
