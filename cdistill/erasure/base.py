"""The frozen eraser every method produces: an affine edit of rank r stored as two factors.

Every linear eraser in this package has the form

    r(x) = x - L R^T (x - b)

with ``L = proj_left [d, r]``, ``R = proj_right [d, r]`` and ``b = bias [d]``. LEACE gives an
oblique projection (L != R); INLP, RLACE and ClArC give orthogonal ones (L == R, orthonormal).
Storing the factors instead of the d x d matrix makes applying cost O(N d r) and the
checkpoint O(d r), and one class lets a config switch swap methods freely.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cdistill.errors import CdistillError
from cdistill.utils.buffers import FittedBuffers

_HALF = (torch.float16, torch.bfloat16)


def check_finite(name: str, t: Tensor) -> None:
    """Raise a clear error if ``t`` holds NaN or Inf (erasing such data would be silently wrong).

    Args:
        name: What ``t`` is, for the message (e.g. ``"x"``).
        t: Any tensor; integer and bool tensors are always finite.
    """
    if not (t.is_floating_point() or t.is_complex()):
        return
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        raise CdistillError(
            f"{name} holds {int(bad.sum())} non-finite value(s) (NaN or Inf) out of {t.numel()}; "
            "concept erasure needs finite inputs. Check the layer's activations or the labels."
        )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an eraser computes in for inputs of ``dtype``.

    Half-precision inputs (float16, bfloat16) are upcast to float32: subtracting a large bias
    and then a small correction in bfloat16 (8 mantissa bits) would lose most of the edit.
    float32 and float64 inputs are computed in their own dtype.
    """
    return torch.float32 if dtype in _HALF else dtype


class LowRankEraser(FittedBuffers):
    """A frozen affine eraser ``r(x) = x - proj_left @ proj_right.T @ (x - bias)``.

    The factors are buffers, so they go into ``state_dict``, move with ``.to(device)`` and
    load into an eraser of any rank (buffers are resized on load).

    Args:
        proj_left: ``[d, r]`` left factor L of the edit ``P = L R^T``.
        proj_right: ``[d, r]`` right factor R.
        bias: ``[d]`` point the edit is centred on (the data mean for affine erasers, zeros
            for linear ones). ``None`` means zeros.
        method: Name of the method that produced the eraser (for logs and reprs).
    """

    proj_left: Tensor
    proj_right: Tensor
    bias: Tensor
    resizable = ("proj_left", "proj_right", "bias")

    def __init__(
        self,
        proj_left: Tensor,
        proj_right: Tensor,
        bias: Tensor | None = None,
        *,
        method: str = "linear",
    ) -> None:
        super().__init__()
        if proj_left.ndim != 2 or proj_left.shape != proj_right.shape:
            raise CdistillError(
                "proj_left and proj_right must both have shape [d, r]; got "
                f"{tuple(proj_left.shape)} and {tuple(proj_right.shape)}."
            )
        d = proj_left.shape[0]
        if bias is None:
            bias = proj_left.new_zeros(d)
        if bias.shape != (d,):
            raise CdistillError(f"bias must have shape [{d}]; got {tuple(bias.shape)}.")
        self.method = method
        # Contiguous copies: the matmul kernel (and so the last bit of the output) depends on
        # strides, and a reloaded checkpoint must compute exactly what the fitted eraser did.
        self.register_buffer("proj_left", proj_left.detach().contiguous().clone())
        self.register_buffer("proj_right", proj_right.detach().contiguous().clone())
        self.register_buffer("bias", bias.detach().clone())

    @classmethod
    def identity(cls, dim: int, *, dtype: torch.dtype = torch.float64) -> LowRankEraser:
        """An eraser of rank 0 that returns its input unchanged (for ``dim`` features)."""
        empty = torch.zeros(dim, 0, dtype=dtype)
        return cls(empty, empty, torch.zeros(dim, dtype=dtype), method="identity")

    @property
    def dim(self) -> int:
        """Number of features d the eraser was fitted on."""
        return int(self.proj_left.shape[0])

    @property
    def rank(self) -> int:
        """Rank r of the edit (number of directions touched)."""
        return int(self.proj_left.shape[1])

    def projection(self) -> Tensor:
        """The dense edit matrix ``P = L R^T`` ``[d, d]`` (for inspection and tests; O(d^2))."""
        return self.proj_left @ self.proj_right.T

    def forward(self, x: Tensor) -> Tensor:
        """Erase the concept from ``x``.

        Half-precision inputs are computed in float32 and cast back once at the end; float32
        and float64 inputs are computed in their own dtype (see :func:`compute_dtype`).

        Args:
            x: ``[..., d]`` features (any leading shape, e.g. ``[N, d]`` or ``[B, T, d]``).

        Returns:
            ``[..., d]`` erased features, same dtype and device as ``x``.
        """
        if x.shape[-1:] != (self.dim,):
            raise CdistillError(
                f"This eraser was fitted on d={self.dim} features, but the input has "
                f"shape {tuple(x.shape)} (last dim {x.shape[-1] if x.ndim else 'none'}). For a "
                "conv map [B, C, H, W] erase per position with x.movedim(1, -1) (d = C), or "
                "flatten it (d = C*H*W) to match how the eraser was fitted."
            )
        if not x.is_floating_point():
            raise CdistillError(f"x must be a floating tensor; got {x.dtype}.")
        if self.rank == 0:
            return x
        ct = compute_dtype(x.dtype)
        left = self.proj_left.to(ct)
        right = self.proj_right.to(ct)
        # Centre first: with large offsets, x @ R - b @ R would cancel catastrophically.
        centred = x.to(ct) - self.bias.to(ct)
        out = x.to(ct) - (centred @ right) @ left.T
        return out.to(x.dtype)

    def erase_channels(self, x: Tensor) -> Tensor:
        """Erase along dim 1 of a channel-first map, without moving the channels last.

        Equals ``forward(x.movedim(1, -1)).movedim(-1, 1)`` (up to rounding), but works in the
        map's own layout with one batched matmul: moving channels last makes a strided copy
        on the way in and leaves a channels-last tensor for the next layers, which cost more
        than the erasure itself on a small conv map. For few channels (``C <= 8 r``) the dense
        form ``(I - P) x + P b`` is one fused ``baddbmm``; otherwise the low-rank form
        ``x - L (R^T (x - b))`` keeps the cost at O(C r) per position.

        Args:
            x: ``[B, C, *spatial]`` map (e.g. a conv output ``[B, C, H, W]``), C = :attr:`dim`.

        Returns:
            The erased map, same shape, dtype and device as ``x``.
        """
        if x.ndim < 3 or x.shape[1] != self.dim:
            raise CdistillError(
                f"This eraser was fitted on d={self.dim} channels, but the map has shape "
                f"{tuple(x.shape)}; erase_channels needs [B, {self.dim}, ...]."
            )
        if not x.is_floating_point():
            raise CdistillError(f"x must be a floating tensor; got {x.dtype}.")
        if self.rank == 0:
            return x
        ct = compute_dtype(x.dtype)
        b, c = x.shape[:2]
        flat = x.to(ct).reshape(b, c, -1)  # [B, C, S]
        left, right, bias = self.proj_left.to(ct), self.proj_right.to(ct), self.bias.to(ct)
        if c <= 8 * self.rank:
            proj = left @ right.T  # [C, C]
            keep = torch.eye(c, dtype=ct, device=x.device) - proj
            out = torch.baddbmm((proj @ bias)[None, :, None], keep.expand(b, c, c), flat)
        else:
            coords = torch.matmul(right.T, flat - bias[:, None])  # [B, r, S]
            out = torch.baddbmm(flat, left.expand(b, c, self.rank), coords, alpha=-1)
        return out.view(x.shape).to(x.dtype)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, dim={self.dim}, rank={self.rank}"

