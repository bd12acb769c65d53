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
  colours whatever is drawn: a colour, a material);
* ``moments``: as ``position``, but each channel's foreground mean *and* spread are matched,
  ``a' = mu_j + (sigma_j / sigma_y) (a - mu_y)`` (the per-channel moment matching of style
  transfer): after a non-linearity a colour *scales* a channel's response to a stroke rather than
  adding to it, which no constant shift can express;
* ``gain``: as ``position``, but the shift at each position is scaled by how strongly the
  position expresses the own value, ``a' = a + g (mu_j - mu_y)`` with ``g = <a - b, mu_y - b> /
  |mu_y - b|^2`` (``b``: the blank image's channel vector): a faint stroke edge is recoloured
  faintly, and where a channel pattern carries the shape in the own value's channels (after a
  colour-selective first layer) the same shape is drawn into the other value's channels;
* ``transport``: as ``moments`` with the channels' covariance instead of their spreads: the
  linear optimal-transport (Monge) map between the two values' foreground channel distributions
  taken as Gaussians, ``a' = mu_j + A (a - mu_y)``, ``A = S_y^-1/2 (S_y^1/2 S_j S_y^1/2)^1/2
  S_y^-1/2`` (the whitening-colouring transform of style transfer): it can mix channels, which a
  cue that one layer spreads over several channels needs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from cdistill.errors import CdistillError

SHIFT_MODES = ("flatten", "position", "moments", "gain", "transport")
#: ``moments`` mode: a channel whose spread is under this share of the largest is not rescaled
#: (its ratio of spreads would be noise over a near-zero denominator).
MIN_SPREAD = 0.05
#: A position is foreground when its channel vector differs from the blank image's by more
#: than this share of the map's largest difference (the same rule as position-mode CAV rows).
FOREGROUND_THRESHOLD = 0.1
#: ``transport`` mode: ridge added to each covariance, as a share of its mean variance (dead or
#: constant channels would make ``S_y`` singular).
COVARIANCE_RIDGE = 1e-2


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
        ``[V, *shape]`` (flatten), ``[V, C]`` (position), ``[V, 2, C]`` (moments: mean, std) or
        ``[V, 1 + C, C]`` (transport: the mean, then the covariance).
    """
    if mode == "flatten":
        return torch.stack([a.mean(0) for a in acts])
    if acts[0].dim() != 4:
        raise CdistillError(f"Position-mode counterfactuals need [N, C, H, W] maps, got shape {tuple(acts[0].shape)}; "
                            "use the flatten mode at this layer.")
    out = []
    for a in acts:
        mask = foreground(a, blank)
        count = mask.sum().clamp_min(1.0)
        mean = (a * mask).sum((0, 2, 3)) / count
        if mode == "moments":
            var = (((a - mean[None, :, None, None]) ** 2) * mask).sum((0, 2, 3)) / count
            out.append(torch.stack([mean, var.sqrt()]))
        elif mode == "transport":
            rows = (a - mean[None, :, None, None]) * mask  # background rows are 0
            flat = rows.permute(0, 2, 3, 1).reshape(-1, a.shape[1])  # [N*H*W, C]
            cov = flat.T @ flat / count
            out.append(torch.cat([mean[None], cov]))
        else:
            out.append(mean)
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
    if mode in ("moments", "transport"):
        raise ValueError(f"{mode}-mode counterfactuals map, not shift: use affine() / transport()")
    delta = means[other] - means[own]
    if mode == "flatten":
        return delta
    if acts is None or blank is None:
        raise ValueError("position-mode shifts need the samples' and a blank image's activations")
    mask = foreground(acts, blank)
    if mode == "gain":
        ref = blank.mean((0, 2, 3))  # [C] the blank's channel vector
        own_dir = means[own] - ref  # [B, C]
        gain = torch.einsum("bchw,bc->bhw", acts - ref[None, :, None, None], own_dir)
        gain = (gain / own_dir.pow(2).sum(1).clamp_min(1e-12)[:, None, None]).clamp_min(0.0)
        mask = mask * gain[:, None]
    return delta[:, :, None, None] * mask


def affine(stats: Tensor, own: Tensor, other: Tensor, acts: Tensor, blank: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ``(scale, delta)`` with ``a' = scale * a + delta`` moving each foreground
    position's channels from the own value's moments to the other's (``moments`` mode).

    Args:
        stats: ``[V, 2, C]`` per value: foreground mean and std of each channel (:func:`value_means`).
        own: ``[B]`` value index of each sample's cue; other: ``[B]`` the value it is moved to.
        acts: ``[B, C, H, W]`` the samples' activations (where to apply).
        blank: ``[1, C, H, W]`` a blank image's activations.

    Returns:
        ``scale`` and ``delta``, each ``[B, C, H, W]``; background positions get ``(1, 0)``.
    """
    mu_own, mu_other = stats[own, 0], stats[other, 0]  # [B, C]
    sd_own, sd_other = stats[own, 1], stats[other, 1]
    # a channel with (almost) no spread under the own value is only shifted, not rescaled
    spread = sd_own > MIN_SPREAD * stats[:, 1].amax()
    ratio = torch.where(spread, sd_other / sd_own.clamp_min(1e-12), torch.ones_like(sd_own))
    mask = foreground(acts, blank)  # [B, 1, H, W]
    scale = 1 + mask * (ratio - 1)[:, :, None, None]
    delta = mask * (mu_other - ratio * mu_own)[:, :, None, None]
    return scale, delta


def _sym_power(cov: Tensor, power: float) -> Tensor:
    """``cov ** power`` of symmetric positive (semi-)definite ``[..., C, C]`` matrices."""
    evals, evecs = torch.linalg.eigh(cov)
    evals = evals.clamp_min(1e-30) ** power  # only rounding makes one negative: the inputs are PSD
    return (evecs * evals[..., None, :]) @ evecs.transpose(-1, -2)


def transport(stats: Tensor, own: Tensor, other: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample ``(A, d)`` with ``a' = A a + d`` the Gaussian optimal-transport map from the own
    value's foreground channel distribution to the other's (``transport`` mode).

    Args:
        stats: ``[V, 1 + C, C]`` per value: the foreground mean (row 0) and covariance (rows 1..C)
            of the channel vectors (:func:`value_means`).
        own: ``[B]`` value index of each sample's cue; other: ``[B]`` the value it is moved to.

    Returns:
        ``A`` ``[B, C, C]`` and ``d`` ``[B, C]``.
    """
    means, covs = stats[:, 0], stats[:, 1:].double()
    dim = covs.shape[-1]
    # a floor on the mean variance keeps an all-constant map (zero covariance) at A = I
    ridge = COVARIANCE_RIDGE * torch.diagonal(covs, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-6)
    covs = covs + ridge[:, None, None] * torch.eye(dim, dtype=covs.dtype, device=covs.device)
    # every (own, other) pair once: [V, V, C, C]
    root, inv_root = _sym_power(covs, 0.5), _sym_power(covs, -0.5)
    middle = _sym_power(root[:, None] @ covs[None] @ root[:, None], 0.5)
    maps = (inv_root[:, None] @ middle @ inv_root[:, None]).to(stats.dtype)
    matrices = maps[own, other]
    offsets = means[other] - (matrices @ means[own][..., None])[..., 0]
    return matrices, offsets


@contextmanager
def mapped(module: nn.Module, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Replace ``module``'s output ``a`` by ``fn(a)`` during the block's forward passes; the hook
    is removed on exit, also when the block raises."""
    handle = module.register_forward_hook(lambda _m, _i, out: fn(out))
    try:
        yield
    finally:
        handle.remove()
