"""Oracle LEACE: erase a concept when its value z is known at inference time.

With z available, the least-squares edit (in every PSD norm at once) that makes
``Cov(x', z) = 0`` treats each coordinate of x separately: subtract from it its linear
regression on z,

    r(x, z) = x - Sigma_xz Sigma_zz^+ (z - mu_z),

i.e. ``x`` minus ``E_lin[x | z] - E[x]``, its best linear prediction from z around the mean.
The edit only moves samples along directions that z explains, so it is smaller than LEACE's
(which must act without z). Caveat (Belrose et al.): because the edit depends on the true
label it can *add* non-linearly decodable information about z; do not train deep models on
its output, use plain LEACE for that.

It is built from the same statistics as :class:`LeaceFitter` (:func:`build_oracle`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cdistill.erasure.base import check_finite, compute_dtype
from cdistill.erasure.linalg import concept_basis
from cdistill.erasure.moments import CrossMoments, encode_concept
from cdistill.errors import CdistillError


class OracleEraser(nn.Module):
    """Frozen oracle eraser ``r(x, z) = x - coef @ (z - mean_z)``.

    Buffers: ``coef [d, k]`` (regression of x on z), ``mean_z [k]``.

    Args:
        coef: ``[d, k]`` coefficients ``Sigma_xz Sigma_zz^+``.
        mean_z: ``[k]`` mean of the encoded concept.
        num_classes: Class count when z is passed as integer ids (one-hot encoded).
    """

    coef: Tensor
    mean_z: Tensor

    def __init__(self, coef: Tensor, mean_z: Tensor, num_classes: int | None = None) -> None:
        super().__init__()
        if coef.ndim != 2 or mean_z.shape != (coef.shape[1],):
            raise CdistillError(
                f"coef must be [d, k] and mean_z [k]; got {tuple(coef.shape)}, {tuple(mean_z.shape)}."
            )
        self.num_classes = num_classes
        self.register_buffer("coef", coef.detach().clone())
        self.register_buffer("mean_z", mean_z.detach().clone())

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """Erase the concept from ``x`` given its values ``z``.

        Args:
            x: ``[N, d]`` features (half precision is computed in float32, cast back).
            z: ``[N]`` integer ids (with ``num_classes``), or ``[N]`` / ``[N, k]`` values.

        Returns:
            ``[N, d]`` edited features in ``x``'s dtype.
        """
        d, k = self.coef.shape
        if x.ndim != 2 or x.shape[1] != d:
            raise CdistillError(
                f"OracleEraser was fitted on d={d} features; got x of shape {tuple(x.shape)}."
            )
        if z.shape[0] != x.shape[0]:
            raise CdistillError(f"x has {x.shape[0]} rows but z has {z.shape[0]}.")
        check_finite("x", x)
        ct = compute_dtype(x.dtype)
        zc = encode_concept(z, k, self.num_classes).to(self.mean_z) - self.mean_z
        edit = (zc @ self.coef.T).to(ct)
        return (x.to(ct) - edit).to(x.dtype)


@torch.no_grad()
def build_oracle(stats: CrossMoments) -> OracleEraser:
    """Build an :class:`OracleEraser` from streamed statistics (e.g. a ``LeaceFitter``).

    ``Sigma_zz^+`` is taken on the directions in which z varies (one-hot redundancy and
    absent classes removed, see :func:`linalg.concept_basis`); any generalised inverse gives
    the same edit because the rows of ``Sigma_xz`` lie in the range of ``Sigma_zz``.

    Raises:
        CdistillError: Fewer than 2 samples, or a constant concept.
    """
    sigma_zz, mean_z = stats.sigma_zz(), stats.mean_z()
    basis = concept_basis(sigma_zz, mean_z)  # [k, k']
    if basis.shape[1] == 0:
        raise CdistillError(
            "The concept is constant on the fitted data; the oracle eraser would do nothing."
        )
    inner = basis.T @ sigma_zz @ basis  # [k', k'], diagonal up to rounding
    ginv = basis @ torch.linalg.solve(inner, basis.T)  # [k, k]
    coef = stats.sigma_xz() @ ginv
    return OracleEraser(coef, mean_z, stats.num_classes)
