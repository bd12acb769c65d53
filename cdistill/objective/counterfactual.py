"""Latent counterfactuals from concept images (docs/methods.md §2.9).

A training image of class ``y`` carries the cue of value ``y`` (ColorMNIST: colour ``y``). Its
counterfactual with the cue of value ``j`` is out of reach in pixel space for a cue we only know
from example images, but in a layer where the cue adds to the rest of the representation it is
one step away: move the activation by the difference of the two values' concept means,

    a' = a + (mu_j - mu_y),   mu_k = mean activation of the concept-k images,

and train the rest of the network to predict ``y`` from ``a'``: the cue now points elsewhere,
the label does not, as in training data where the bias is decorrelated. The means are taken on
the current student at every step, so the shift follows the features as they change (a
re-encoded cue is re-measured). Two ways to take a mean:

* ``flatten``: the mean of the whole map ``[C, H, W]`` (a cue with a place and a shape: a glyph,
  a patch, a texture's layout);
* ``position``: the mean channel vector ``[C]`` over the positions where the concept images
  differ from a blank image, added at the positions where the training image does (a cue that
  colours whatever is drawn: a colour, a material).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cdistill.errors import CdistillError

SHIFT_MODES = ("flatten", "position")
#: A position is foreground when its channel vector differs from the blank image's by more
#: than this share of the map's largest difference (the same rule as position-mode CAV rows).
FOREGROUND_THRESHOLD = 0.1


@dataclass(frozen=True)
class ShiftLayer:
    """One layer of the counterfactual term: a module path and how its concept means are taken.

    Args:
        layer: Module path (``input``, ``pool1``, ``layer3``).
        mode: One of :data:`SHIFT_MODES`.
    """

    layer: str
    mode: str = "flatten"

    def __post_init__(self) -> None:
        if self.mode not in SHIFT_MODES:
            raise CdistillError(f"Counterfactual layer {self.layer!r}: mode {self.mode!r} is not one of {SHIFT_MODES}.")

    @classmethod
    def parse(cls, text: str) -> ShiftLayer:
        """``"pool1"`` (flatten) or ``"input:position"``."""
        layer, _, mode = str(text).partition(":")
        if not layer:
            raise CdistillError(f"Counterfactual layer {text!r}: give a module path, e.g. pool1 or input:position.")
        return cls(layer, mode or "flatten")

    def __str__(self) -> str:
        return self.layer if self.mode == "flatten" else f"{self.layer}:{self.mode}"


def foreground(acts: Tensor, blank: Tensor, threshold: float = FOREGROUND_THRESHOLD) -> Tensor:
    """Positions where a map differs from a blank image's.

    Args:
        acts: ``[N, C, H, W]`` activations.
        blank: ``[1, C, H, W]`` activations of a blank (black) image.
        threshold: Share of each map's largest difference a position must exceed.

    Returns:
        ``[N, 1, H, W]`` mask of 0/1 in ``acts``' dtype.
    """
    norm = (acts - blank).norm(dim=1, keepdim=True)
    return (norm > threshold * norm.amax(dim=(2, 3), keepdim=True)).to(acts.dtype)


def value_means(acts: Sequence[Tensor], blank: Tensor, mode: str) -> Tensor:
    """The concept mean of each cue value.

    Args:
        acts: One ``[N_k, *shape]`` activation tensor per value.
        blank: ``[1, *shape]`` activations of a blank image (``position`` mode).
        mode: ``flatten`` (mean map) or ``position`` (mean foreground channel vector).

    Returns:
        ``[V, *shape]`` (flatten) or ``[V, C]`` (position).
    """
    if mode == "flatten":
        return torch.stack([a.mean(0) for a in acts])
    if acts[0].dim() != 4:
        raise CdistillError(f"Position-mode counterfactuals need [N, C, H, W] maps, got shape {tuple(acts[0].shape)}; "
                            "use the flatten mode at this layer.")
    out = []
    for a in acts:
        mask = foreground(a, blank)
        out.append((a * mask).sum((0, 2, 3)) / mask.sum().clamp_min(1.0))
    return torch.stack(out)


def shift(means: Tensor, own: Tensor, other: Tensor, mode: str, acts: Tensor | None = None,
          blank: Tensor | None = None) -> Tensor:
    """Per-sample shift ``mu_other - mu_own`` in the layer's shape.

    Args:
        means: ``[V, *shape]`` or ``[V, C]`` from :func:`value_means`.
        own: ``[B]`` value index of each sample's own cue.
        other: ``[B]`` value index of the cue it is moved to.
        mode: ``flatten`` or ``position``.
        acts: ``[B, C, H, W]`` the samples' activations (``position``: where to add).
        blank: ``[1, C, H, W]`` a blank image's activations (``position``).

    Returns:
        ``[B, *shape]`` to add to the layer's output.
    """
    delta = means[other] - means[own]
    if mode == "flatten":
        return delta
    if acts is None or blank is None:
        raise ValueError("position-mode shifts need the samples' and a blank image's activations")
    return delta[:, :, None, None] * foreground(acts, blank)


@contextmanager
def added(module: nn.Module, delta: Tensor) -> Iterator[None]:
    """Add ``delta`` to ``module``'s output during the block's forward passes; the hook is
    removed on exit, also when the block raises."""
    handle = module.register_forward_hook(lambda _m, _i, out: out + delta)
    try:
        yield
    finally:
        handle.remove()
