"""INLP, RLACE, ClArC and the method switch: each removes a planted linear concept."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor

from cdistill.erasure import (
    METHODS,
    LowRankEraser,
    clarc_eraser,
    fantope_project,
    fit_clarc,
    fit_eraser,
    fit_inlp,
    fit_logistic,
    fit_rlace,
)
from cdistill.erasure.inlp import orthonormal_extend
from cdistill.errors import CdistillError

F64 = torch.float64


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matrices: thread hand-offs on a shared 2-core box cost more than the maths."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted(
    n: int, d: int, *, seed: int, k: int = 2, strength: float = 1.5
) -> tuple[Tensor, Tensor]:
    """Correlated Gaussian noise plus a class-dependent shift along k - 1 fixed directions.

    The mixing matrix and directions depend only on (d, k), so two seeds give two samples
    from the same distribution.
    """
    fixed = torch.Generator().manual_seed(1000 + d + k)
    mixing = torch.eye(d, dtype=F64) + 0.3 * torch.randn(d, d, generator=fixed, dtype=F64)
    means = strength * torch.randn(k, d, generator=fixed, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, k, (n,), generator=g)
    x = torch.randn(n, d, generator=g, dtype=F64) @ mixing.T + means[z] + 4.0
    return x, z


def held_out_accuracy(eraser: torch.nn.Module, d: int, k: int = 2) -> tuple[float, float]:
    """Accuracy of a fresh probe trained on erased data and tested on new erased data."""
    x, z = planted(3000, d, seed=1, k=k)
    xt, zt = planted(3000, d, seed=2, k=k)
    probe = fit_logistic(eraser(x), z, k, max_iter=200)
    chance = float(torch.bincount(zt).max()) / len(zt)
    return probe.accuracy(eraser(xt), zt), chance


def binomial_margin(p: float, n: int = 3000) -> float:
    return 3.5 * math.sqrt(p * (1 - p) / n)


def test_concept_is_decodable_before_erasure(one_thread: None) -> None:
    identity = LowRankEraser.identity(12)
    acc, chance = held_out_accuracy(identity, 12)
    assert acc > chance + 0.3


def test_inlp_reaches_chance(one_thread: None) -> None:
    x, z = planted(3000, 12, seed=1)
    eraser = fit_inlp(x, z, n_iter=12)
    assert 1 <= eraser.rank <= 12
    q = eraser.proj_left
    assert torch.allclose(q.T @ q, torch.eye(eraser.rank, dtype=F64), atol=1e-10)
    acc, chance = held_out_accuracy(eraser, 12)
    assert acc <= chance + binomial_margin(chance) + 0.02


def test_inlp_multiclass(one_thread: None) -> None:
    x, z = planted(3000, 10, seed=1, k=3)
    eraser = fit_inlp(x, z, num_classes=3, n_iter=10)
    acc, chance = held_out_accuracy(eraser, 10, k=3)
    assert acc <= chance + binomial_margin(chance) + 0.03


def test_rlace_reaches_chance_with_rank_one(one_thread: None) -> None:
    x, z = planted(3000, 8, seed=1)
    eraser = fit_rlace(x, z, rank=1, n_steps=400, eval_every=100)
    assert eraser.rank == 1
    acc, chance = held_out_accuracy(eraser, 8)
    assert acc <= chance + binomial_margin(chance) + 0.03


@pytest.mark.parametrize(("d", "k"), [(5, 1), (30, 3), (6, 6), (40, 2)])
def test_fantope_projection(d: int, k: int) -> None:
    g = torch.Generator().manual_seed(d)
    a = 2 * torch.randn(d, d, generator=g, dtype=F64)
    p = fantope_project(a, k)
    evals = torch.linalg.eigvalsh(p)
    assert torch.allclose(p, p.T)
    assert float(evals.min()) >= -1e-12 and float(evals.max()) <= 1 + 1e-12
    assert float(torch.trace(p)) == pytest.approx(k, abs=1e-9)
    # A point already in the Fantope is its own projection.
    assert torch.allclose(fantope_project(p, k), p, atol=1e-10)
    # Projection is the nearest Fantope point: no random Fantope point is closer.
    sym = (a + a.T) / 2
    for _ in range(10):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
        w = torch.rand(d, generator=g, dtype=F64)
        w = w / w.sum() * k
        if float(w.max()) > 1:
            continue
        other = (q * w) @ q.T
        assert float((sym - p).norm()) <= float((sym - other).norm()) + 1e-10


def test_p_clarc_projects_out_the_cav() -> None:
    x, z = planted(3000, 12, seed=1, strength=1.0)
    x_c, x_r = x[z == 1], x[z == 0]
    eraser = fit_clarc(x_c, x_r, mode="p")
    v = eraser.proj_left[:, 0]
    assert float(v.norm()) == pytest.approx(1.0)
    out = eraser(x)
    # Every sample now sits at the reference mean's coordinate along the CAV.
    assert torch.allclose(out @ v, torch.full((3000,), float(x_r.mean(0) @ v), dtype=F64))
    # Orthogonal complement untouched.
    assert torch.allclose(out - (out @ v)[:, None] * v, x - (x @ v)[:, None] * v)
    # Binary + mean-difference CAV: class means now coincide -> chance for linear probes.
    acc, chance = held_out_accuracy(eraser, 12)
    assert acc <= chance + binomial_margin(chance) + 0.02


def test_a_clarc_adds_the_concept() -> None:
    x, z = planted(2000, 6, seed=3)
    x_c, x_r = x[z == 1], x[z == 0]
    eraser = fit_clarc(x_c, x_r, mode="a")
    v = eraser.proj_left[:, 0]
    out = eraser(x_r)
    assert torch.allclose(out @ v, torch.full((len(x_r),), float(x_c.mean(0) @ v), dtype=F64))
    cav = torch.zeros(6, dtype=F64)
    cav[0] = 2.0
    given = fit_clarc(x_c, x_r, cav=cav)
    assert torch.equal(given.proj_left[:, 0], torch.eye(6, dtype=F64)[0])
    with pytest.raises(CdistillError, match="zero vector"):
        clarc_eraser(torch.zeros(6), torch.zeros(6))
    with pytest.raises(CdistillError, match="mode"):
        fit_clarc(x_c, x_r, mode="q")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "rlace"])
def test_method_switch_gives_same_interface(method: str) -> None:
    x, z = planted(1500, 8, seed=4)
    kwargs = {"num_classes": 2} if method in ("leace", "orth") else {}
    eraser = fit_eraser(method, x, z, **kwargs)
    assert isinstance(eraser, LowRankEraser)
    out = eraser(x.float().reshape(3, 500, 8))
    assert out.shape == (3, 500, 8) and out.dtype == torch.float32
    acc, chance = held_out_accuracy(eraser, 8)
    assert acc <= chance + binomial_margin(chance) + 0.03


def test_unknown_method_lists_choices() -> None:
    x, z = planted(10, 3, seed=5)
    with pytest.raises(CdistillError, match="leace"):
        fit_eraser("leaec", x, z)


def test_orthonormal_extend_skips_dependent_directions() -> None:
    q = torch.eye(5, dtype=F64)[:, :2]
    new = torch.stack([torch.tensor([1.0, 1.0, 0, 0, 0]), torch.tensor([0, 0, 3.0, 0, 0])], 1)
    out = orthonormal_extend(q, new.to(F64))
    assert out.shape == (5, 3)
    assert torch.allclose(out.T @ out, torch.eye(3, dtype=F64))


def test_baselines_reject_bad_input() -> None:
    x, z = planted(50, 4, seed=6)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(CdistillError, match="non-finite"):
        fit_inlp(bad, z)
    with pytest.raises(CdistillError, match="non-finite"):
        fit_rlace(bad, z)
    with pytest.raises(CdistillError, match="integer class ids"):
        fit_inlp(x, z.to(F64))
    with pytest.raises(CdistillError, match="rank"):
        fit_rlace(x, z, rank=4)
