"""The optimiser of the causal basis (:mod:`cdistill.causal.basis`): greedy L-BFGS on the sphere.

Vector ``j`` maximises the energy (:class:`~cdistill.causal.energy.Energy`) over unit vectors
orthogonal to ``v_1..v_{j-1}``: an unconstrained ``u`` is projected away from the earlier vectors
and normalised inside the objective, and L-BFGS with a strong Wolfe line search minimises the
negative energy. It starts from the standard basis vector off the span of the earlier ones along
which the ablation moves the activation most, and the loss is divided by its starting value so
that the optimiser's tolerances (the dtype's eps) are relative.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from cdistill.causal.common import LayerStats
from cdistill.causal.energy import Energy
from cdistill.errors import NonFiniteError


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar when enabled and tqdm is installed, otherwise a no-op stand-in."""
    if enabled:
        try:
            from tqdm.auto import tqdm

            return tqdm(total=total, desc=desc)
        except ImportError:
            pass
    return _NoBar()


def start_direction(basis: Tensor, stats: LayerStats) -> Tensor:
    """The unit start ``[d]`` of the next vector, off the span of ``basis [d, j]``.

    A standard basis vector with the largest squared residual ``1 - ||row i of the basis||^2``
    times the spread: the one along which the ablation moves the activation most (a dead
    channel would be a stationary point of zero energy).
    """
    residual = (1 - basis.pow(2).sum(1)).clamp_min(0)
    score = residual * stats.spread if bool(stats.spread.any()) else residual
    u = torch.zeros(stats.dim, dtype=stats.dtype, device=stats.mean.device)
    u[int(score.argmax())] = 1.0
    return Energy.direction(u, basis)


def optimise_direction(objective: Energy, basis: Tensor, stats: LayerStats, j: int, max_iter: int) -> Tensor:
    """Vector ``j`` ``[d]``: the unit direction orthogonal to ``basis [d, j]`` of most energy."""
    eps = torch.finfo(stats.dtype).eps
    u = start_direction(basis, stats).requires_grad_(True)
    optimiser = torch.optim.LBFGS(
        [u],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=eps,
        tolerance_change=eps,
        line_search_fn="strong_wolfe",
    )
    optimiser.step(functools.partial(objective.loss_and_grad, u, basis, j))
    return Energy.direction(u.detach(), basis)


def greedy_basis(
    objective: Energy, stats: LayerStats, k: int, max_iter: int, min_energy: float, bar: Any
) -> tuple[Tensor, list[Tensor]]:
    """Up to ``k`` orthonormal directions, each of most energy off the span of the earlier ones.

    Returns:
        ``(basis [d, k'], energies)``, in the order found; the search stops at the first
        direction whose energy is under ``min_energy`` (it is dropped).

    Raises:
        NonFiniteError: The energy of an optimised direction is NaN/Inf.
    """
    basis = torch.zeros(stats.dim, 0, dtype=stats.dtype, device=stats.mean.device)
    energies: list[Tensor] = []
    for j in range(k):
        # Energies far below the strongest one are noise for the loss scale.
        objective.start(floor=1e-3 * max((float(e) for e in energies), default=0.0))
        v = optimise_direction(objective, basis, stats, j, max_iter)
        energy = objective.energy(v)
        if not bool(torch.isfinite(energy)):
            raise NonFiniteError(
                f"Non-finite energy at layer {objective.layer!r}, vector {j + 1} after optimisation. "
                "Check the model for overflow or pick another layer."
            )
        bar.update()
        bar.set_postfix_str(f"energy {float(energy):.3g}")
        if float(energy) < min_energy:
            break
        basis = torch.cat([basis, v.unsqueeze(1)], dim=1)
        energies.append(energy)
    return basis, energies
