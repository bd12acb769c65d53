"""Streaming first and second moments of (x, z) as float64 *shifted* sums.

Sums are taken around a shift (the mean of the first batch) rather than around zero:
``sum(x - s)`` and ``sum((x - s)(x - s)^T)``. For activations with a large common offset
(1e4 is not unusual after a ReLU stack) the naive ``sum(x x^T) - n mu mu^T`` cancels away
every significant digit; shifted sums keep them. All sums are buffers, so they are saved in
``state_dict`` and can be summed across DDP ranks (after agreeing on one shift).
"""

from __future__ import annotations

import warnings
from typing import TypeVar, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cdistill.erasure.base import check_finite
from cdistill.errors import CdistillError

_M = TypeVar("_M", bound="CrossMoments")


def encode_concept(z: Tensor, z_dim: int, num_classes: int | None) -> Tensor:
    """Turn concept labels into a float64 matrix ``[N, z_dim]``.

    Args:
        z: Integer class ids ``[N]`` (needs ``num_classes``; one-hot encoded here), bool
            ``[N]`` (a 0/1 feature), or continuous values ``[N]`` / ``[N, z_dim]`` (e.g.
            one-hot or soft labels, or real-valued attributes).
        z_dim: Number of concept columns expected.
        num_classes: Class count for integer ids, else ``None``.

    Returns:
        ``[N, z_dim]`` float64 tensor on ``z``'s device.
    """
    if z.dtype == torch.bool:
        z = z.to(torch.float64)
    if not z.is_floating_point():
        if num_classes is None:
            raise CdistillError(
                f"Got integer concept labels (dtype {z.dtype}) but no num_classes. Integer "
                "labels fed as one continuous feature would leave the concept in for every "
                "class that is not linearly ordered; pass num_classes=K so they are one-hot "
                "encoded (or pass a float tensor if z really is a continuous quantity)."
            )
        if z.ndim != 1:
            raise CdistillError(f"Integer labels must have shape [N]; got {tuple(z.shape)}.")
        if z.numel() and (int(z.min()) < 0 or int(z.max()) >= num_classes):
            raise CdistillError(
                f"Labels must lie in [0, {num_classes}) for num_classes={num_classes}; got "
                f"values in [{int(z.min())}, {int(z.max())}]."
            )
        return nn.functional.one_hot(z.long(), num_classes).to(torch.float64)
    check_finite("z", z)
    if z.ndim == 1:
        z = z[:, None]
    if z.ndim != 2 or z.shape[1] != z_dim:
        hint = (
            f" With num_classes={num_classes}, pass integer ids [N] or one-hot rows [N, {num_classes}]."
            if num_classes is not None
            else ""
        )
        raise CdistillError(
            f"Expected continuous concept values of shape [N, {z_dim}] (or [N] when z_dim=1); "
            f"got {tuple(z.shape)}.{hint}"
        )
    return z.to(torch.float64)


def _looks_like_class_ids(z: Tensor) -> bool:
    """True for a float ``[N]`` / ``[N, 1]`` tensor of >2 distinct integer values."""
    if z.ndim > 2 or (z.ndim == 2 and z.shape[1] != 1) or z.numel() == 0:
        return False
    if not bool(torch.all(z == z.round())):
        return False
    return int(torch.unique(z).numel()) > 2


class CrossMoments(nn.Module):
    """Float64 streaming statistics of features x ``[N, d]`` and a concept z ``[N, k]``.

    Buffers (all float64 except ``n``):
        n: ``[]`` int64 sample count.
        shift_x, shift_z: ``[d]``, ``[k]`` shifts (mean of the first batch).
        sum_x, sum_z: ``[d]``, ``[k]`` sums of ``x - shift_x`` and ``z - shift_z``.
        sum_xx: ``[d, d]`` sum of ``(x - s_x)(x - s_x)^T``.
        sum_xz: ``[d, k]`` sum of ``(x - s_x)(z - s_z)^T``.
        sum_zz: ``[k, k]`` sum of ``(z - s_z)(z - s_z)^T``.

    Args:
        x_dim: Number of features d.
        z_dim: Number of concept columns k; defaults to ``num_classes`` or 1.
        num_classes: Class count when z is given as integer ids (one-hot encoded inside).
        device: Where the statistics live.
        dtype: Dtype of the statistics (float64 unless memory forces otherwise).
    """

    n: Tensor
    shift_x: Tensor
    shift_z: Tensor
    sum_x: Tensor
    sum_z: Tensor
    sum_xx: Tensor
    sum_xz: Tensor
    sum_zz: Tensor

    def __init__(
        self,
        x_dim: int,
        z_dim: int | None = None,
        num_classes: int | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        if num_classes is not None and num_classes < 2:
            raise CdistillError(f"num_classes must be >= 2; got {num_classes}.")
        if z_dim is None:
            z_dim = num_classes if num_classes is not None else 1
        if num_classes is not None and z_dim != num_classes:
            raise CdistillError(
                f"z_dim={z_dim} disagrees with num_classes={num_classes}; one-hot labels have "
                "one column per class (leave z_dim unset)."
            )
        if x_dim < 1 or z_dim < 1:
            raise CdistillError(f"x_dim and z_dim must be positive; got {x_dim}, {z_dim}.")
        self.x_dim = x_dim
        self.z_dim = z_dim
        self.num_classes = num_classes
        self._warned_ids = False

        def zeros(*shape: int) -> Tensor:
            return torch.zeros(*shape, device=device, dtype=dtype)

        self.register_buffer("n", torch.zeros((), dtype=torch.int64, device=device))
        self.register_buffer("shift_x", zeros(x_dim))
        self.register_buffer("shift_z", zeros(z_dim))
        self.register_buffer("sum_x", zeros(x_dim))
        self.register_buffer("sum_z", zeros(z_dim))
        self.register_buffer("sum_xx", zeros(x_dim, x_dim))
        self.register_buffer("sum_xz", zeros(x_dim, z_dim))
        self.register_buffer("sum_zz", zeros(z_dim, z_dim))

    @property
    def count(self) -> int:
        """Number of samples seen."""
        return int(self.n)

    @torch.no_grad()
    def update(self: _M, x: Tensor, z: Tensor) -> _M:
        """Add a batch to the statistics (any float dtype; accumulated in the stats dtype).

        Args:
            x: ``[N, d]`` features, or ``[..., d]`` with z's leading shape matching.
            z: Concept for each row: integer ids ``[N]`` (with ``num_classes``), bool ``[N]``,
                or continuous ``[N]`` / ``[N, k]``.

        Returns:
            ``self``, for chaining.
        """
        if x.shape[-1:] != (self.x_dim,):
            raise CdistillError(
                f"Fitter expects x with last dim {self.x_dim}; got shape {tuple(x.shape)}."
            )
        if not x.is_floating_point():
            raise CdistillError(f"x must be a floating tensor; got {x.dtype}.")
        lead = x.shape[:-1]
        x = x.reshape(-1, self.x_dim)
        if z.shape[: len(lead)] != lead:
            raise CdistillError(
                f"x has leading shape {tuple(lead)} but z has shape {tuple(z.shape)}; give one "
                "concept value (or row) per feature vector."
            )
        z = z.reshape(x.shape[0], *z.shape[len(lead) :])
        check_finite("x", x)
        # Checked on the first batch only (it costs a sort); one warning per fitter.
        first = self.count == 0
        if first and z.is_floating_point() and not self._warned_ids and _looks_like_class_ids(z):
            self._warned_ids = True
            warnings.warn(
                "z looks like class ids stored as floats; it is treated as ONE continuous "
                "feature, which leaves non-ordinal class information in. Pass integer labels "
                "with num_classes=K to one-hot encode them.",
                stacklevel=2,
            )
        zf = encode_concept(z, self.z_dim, self.num_classes)
        dt, dev = self.sum_xx.dtype, self.sum_xx.device
        xf = x.to(device=dev, dtype=dt)
        zf = zf.to(device=dev, dtype=dt)
        if xf.shape[0] == 0:
            return self
        if first:  # the shift: any value near the data works, the first batch's mean is one
            self.shift_x.copy_(xf.mean(0))
            self.shift_z.copy_(zf.mean(0))
        xc = xf - self.shift_x
        zc = zf - self.shift_z
        self.sum_x += xc.sum(0)
        self.sum_z += zc.sum(0)
        self.sum_xx.addmm_(xc.T, xc)
        self.sum_xz.addmm_(xc.T, zc)
        self.sum_zz.addmm_(zc.T, zc)
        self.n += xf.shape[0]
        return self

    # ---- derived statistics ---------------------------------------------------------------

    def _need(self, m: int) -> int:
        n = self.count
        if n < m:
            raise CdistillError(
                f"Need at least {m} samples to estimate covariances; the fitter has seen {n}."
            )
        return n

    def mean_x(self) -> Tensor:
        """``[d]`` mean of x."""
        n = self._need(1)
        return self.shift_x + self.sum_x / n

    def mean_z(self) -> Tensor:
        """``[k]`` mean of z."""
        n = self._need(1)
        return self.shift_z + self.sum_z / n

    def _covariance(self, sum_aa: Tensor, sum_a: Tensor) -> Tensor:
        """Unbiased covariance (divisor n - 1) from the sums of ``a a^T`` and ``a``, symmetrised."""
        n = self._need(2)
        c = sum_aa - torch.outer(sum_a, sum_a) / n
        return (c + c.T) / (2 * (n - 1))

    def sigma_xx(self) -> Tensor:
        """``[d, d]`` unbiased covariance of x (divisor n - 1)."""
        return self._covariance(self.sum_xx, self.sum_x)

    def sigma_xz(self) -> Tensor:
        """``[d, k]`` unbiased cross-covariance of x and z."""
        n = self._need(2)
        return (self.sum_xz - torch.outer(self.sum_x, self.sum_z) / n) / (n - 1)

    def sigma_zz(self) -> Tensor:
        """``[k, k]`` unbiased covariance of z."""
        return self._covariance(self.sum_zz, self.sum_z)

    def second_moment_x(self) -> Tensor:
        """``[d, d]`` uncentred second moment ``E[x x^T]`` (divisor n)."""
        n = self._need(1)
        s = self.shift_x
        c = self.sum_xx + torch.outer(self.sum_x, s) + torch.outer(s, self.sum_x)
        c = c / n + torch.outer(s, s)
        return (c + c.T) / 2

    # ---- combining ------------------------------------------------------------------------

    def _reshifted(self, shift_x: Tensor, shift_z: Tensor) -> dict[str, Tensor]:
        """The sums re-expressed around new shifts (exact algebra, no data needed)."""
        n = float(self.count)
        dx = self.shift_x - shift_x
        dz = self.shift_z - shift_z
        sx, sz = self.sum_x, self.sum_z
        # sum(x - t) = sum(x - s) + n (s - t); products expand the same way.
        return {
            "sum_x": sx + n * dx,
            "sum_z": sz + n * dz,
            "sum_xx": self.sum_xx
            + torch.outer(sx, dx)
            + torch.outer(dx, sx)
            + n * torch.outer(dx, dx),
            "sum_xz": self.sum_xz
            + torch.outer(sx, dz)
            + torch.outer(dx, sz)
            + n * torch.outer(dx, dz),
            "sum_zz": self.sum_zz
            + torch.outer(sz, dz)
            + torch.outer(dz, sz)
            + n * torch.outer(dz, dz),
        }

    def _check_compatible(self, other: CrossMoments) -> None:
        if not isinstance(other, CrossMoments):
            raise CdistillError(f"Can only merge statistics; got {type(other).__name__}.")
        mine = (self.x_dim, self.z_dim, self.num_classes)
        theirs = (other.x_dim, other.z_dim, other.num_classes)
        if mine != theirs:
            raise CdistillError(
                f"Cannot merge statistics with (x_dim, z_dim, num_classes)={theirs} into {mine}."
            )

    @torch.no_grad()
    def merge_(self: _M, other: CrossMoments) -> _M:
        """Add ``other``'s samples to ``self`` in place (exact up to rounding).

        Args:
            other: Statistics of the same dimensions, e.g. from another data shard.

        Returns:
            ``self``.
        """
        self._check_compatible(other)
        if other.count == 0:
            return self
        if self.count == 0:
            for name, buf in self.named_buffers(recurse=False):
                buf.copy_(getattr(other, name))
            return self
        moved = other._reshifted(self.shift_x.to(other.shift_x), self.shift_z.to(other.shift_z))
        for name, value in moved.items():
            getattr(self, name).add_(value.to(getattr(self, name)))
        self.n += other.n.to(self.n.device)
        return self

    def merge(self: _M, other: CrossMoments) -> _M:
        """Return new statistics (same class and settings) holding both sets of samples."""
        out = cast(_M, self._empty_like())
        out.merge_(self)
        return out.merge_(other)

    def __add__(self: _M, other: CrossMoments) -> _M:
        return self.merge(other)

    def _empty_like(self) -> CrossMoments:
        """A fresh, empty instance with the same configuration (subclasses override)."""
        return CrossMoments(
            self.x_dim,
            self.z_dim,
            self.num_classes,
            device=self.sum_xx.device,
            dtype=self.sum_xx.dtype,
        )

    @torch.no_grad()
    def all_reduce_(self: _M, group: dist.ProcessGroup | None = None) -> _M:
        """Sum the statistics over all ranks of ``group`` in place (no-op without DDP).

        Each rank's sums are around its own shift, so the ranks first agree on a common one
        (the count-weighted mean of their shifts, near the data mean), move their sums to it,
        and only then add them up. Every rank ends with identical buffers.

        Args:
            group: Process group; the default group when ``None``.

        Returns:
            ``self``.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return self
        n = self.n.to(self.sum_x.dtype).reshape(1)
        weighted = torch.cat([n, n * self.shift_x, n * self.shift_z])
        dist.all_reduce(weighted, group=group)
        total = weighted[0]
        if float(total) == 0:
            return self
        shift_x = weighted[1 : 1 + self.x_dim] / total
        shift_z = weighted[1 + self.x_dim :] / total
        moved = self._reshifted(shift_x, shift_z)
        self.shift_x.copy_(shift_x)
        self.shift_z.copy_(shift_z)
        for name, value in moved.items():
            dist.all_reduce(value, group=group)
            getattr(self, name).copy_(value)
        count = self.n.clone()
        dist.all_reduce(count, group=group)
        self.n.copy_(count)
        return self
