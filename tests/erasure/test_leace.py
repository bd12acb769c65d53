"""LEACE: streaming statistics, the erasure guarantee, agreement with concept-erasure, dtypes,
bad inputs, oracle LEACE and DDP reduction.

Every check compares against something computed independently in the test (a float64
two-pass covariance, a least-squares solve, the reference package, sklearn).
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from cdistill.erasure import (
    LeaceEraser,
    LeaceFitter,
    LowRankEraser,
    OracleEraser,
    Whitener,
    build_oracle,
    oas_shrinkage,
)
from cdistill.errors import CdistillError

F64 = torch.float64


# ---- helpers ---------------------------------------------------------------------------------


def make_data(
    n: int,
    d: int,
    k: int,
    *,
    cond: float = 10.0,
    offset: float = 0.0,
    signal: float = 1.0,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Gaussian classes with a random rotation, spectrum from 1 down to 1/cond, an offset.

    Returns:
        x ``[n, d]`` float64 and integer labels z ``[n]`` in [0, k).
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    scales = torch.logspace(0, -math.log10(cond) / 2, d, dtype=F64)  # std devs
    z = torch.randint(0, k, (n,), generator=g)
    means = signal * torch.randn(k, d, generator=g, dtype=F64)
    x = (torch.randn(n, d, generator=g, dtype=F64) * scales) @ q.T + means[z] + offset
    return x, z


def one_hot(z: Tensor, k: int) -> Tensor:
    return torch.nn.functional.one_hot(z, k).to(F64)


def two_pass(x: Tensor, zf: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reference mean ``[d]``, covariance ``[d, d]`` and cross-covariance ``[d, k]``."""
    x, zf = x.to(F64), zf.to(F64)
    xc, zc = x - x.mean(0), zf - zf.mean(0)
    n = x.shape[0]
    return x.mean(0), xc.T @ xc / (n - 1), xc.T @ zc / (n - 1)


def cross_cov(x: Tensor, zf: Tensor) -> Tensor:
    return two_pass(x, zf)[2]


def rel(a: Tensor, b: Tensor) -> float:
    """Relative Frobenius difference ``||a - b|| / ||b||``."""
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def residual(eraser: Callable[[Tensor], Tensor], x: Tensor, zf: Tensor) -> float:
    """``||Cov(r(x), z)|| / ||Cov(x, z)||`` measured in float64."""
    return float(cross_cov(eraser(x).to(F64), zf).norm() / cross_cov(x.to(F64), zf).norm())


def split_points(n: int, cuts: list[float]) -> list[int]:
    return sorted({0, n, *(int(c * n) for c in cuts)})


# ---- streaming statistics --------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(
    d=st.integers(1, 10),
    k=st.integers(2, 5),
    n=st.integers(3, 150),
    log_cond=st.floats(0, 8),
    offset=st.sampled_from([0.0, 1.0, -3e2, 1e4]),
    cuts=st.lists(st.floats(0, 1), max_size=6),
    seed=st.integers(0, 2**16),
)
def test_streaming_equals_batch_equals_two_pass(
    d: int, k: int, n: int, log_cond: float, offset: float, cuts: list[float], seed: int
) -> None:
    x, z = make_data(n, d, k, cond=10**log_cond, offset=offset, seed=seed)
    batch = LeaceFitter(d, num_classes=k).update(x, z)
    stream = LeaceFitter(d, num_classes=k)
    pts = split_points(n, cuts)
    for a, b in itertools.pairwise(pts):
        stream.update(x[a:b], z[a:b])
    mean, sxx, sxz = two_pass(x, one_hot(z, k))
    assert stream.count == batch.count == n
    for fitter in (batch, stream):
        assert rel(fitter.mean_x(), mean) < 1e-13
        assert rel(fitter.sigma_xx(), sxx) < 1e-9
        # Cross-covariance can be tiny when classes coincide; compare on the x scale.
        assert float((fitter.sigma_xz() - sxz).norm()) <= 1e-9 * float(sxx.norm()) + 1e-300


@settings(max_examples=25, deadline=None)
@given(
    d=st.integers(1, 8),
    n=st.integers(6, 120),
    offset=st.sampled_from([0.0, 1e4]),
    cuts=st.lists(st.floats(0.01, 0.99), min_size=2, max_size=2),
    seed=st.integers(0, 2**16),
)
def test_merge_of_unequal_splits_is_associative(
    d: int, n: int, offset: float, cuts: list[float], seed: int
) -> None:
    x, z = make_data(n, d, 3, offset=offset, seed=seed)
    zc = z.to(F64) * 0.7 - 1  # continuous concept, shifts differ between parts
    i, j = sorted(int(c * n) for c in cuts)
    parts = [LeaceFitter(d).update(x[a:b], zc[a:b]) for a, b in ((0, i), (i, j), (j, n))]
    full = LeaceFitter(d).update(x, zc)
    left = (parts[0] + parts[1]) + parts[2]
    right = parts[0].merge(parts[1].merge(parts[2]))
    for m in (left, right):
        assert m.count == n
        assert rel(m.sigma_xx(), full.sigma_xx()) < 1e-9
        assert float((m.sigma_xz() - full.sigma_xz()).norm()) < 1e-9 * float(full.sigma_xx().norm())
        assert rel(m.mean_x(), full.mean_x()) < 1e-13
    # Inputs are not modified by merge().
    assert parts[0].count == i


def test_float32_inputs_with_large_offset_are_accurate() -> None:
    x, z = make_data(20_000, 16, 4, cond=100, offset=1e4, seed=1)
    x32 = x.float()
    fitter = LeaceFitter(16, num_classes=4)
    for chunk, zz in zip(x32.split(1000), z.split(1000), strict=True):
        fitter.update(chunk, zz)
    _, sxx, sxz = two_pass(x32.double(), one_hot(z, 4))
    assert rel(fitter.sigma_xx(), sxx) < 1e-4
    assert rel(fitter.sigma_xz(), sxz) < 1e-4


def test_half_precision_inputs_fit() -> None:
    x, z = make_data(500, 6, 3, seed=2)
    for dt in (torch.float16, torch.bfloat16):
        xl = x.to(dt)
        fitter = LeaceFitter(6, num_classes=3).update(xl, z)
        _, sxx, _ = two_pass(xl.double(), one_hot(z, 3))
        assert rel(fitter.sigma_xx(), sxx) < 1e-12
        eraser = fitter.build()
        assert residual(eraser, xl.double(), one_hot(z, 3)) < 1e-10


def test_leading_dims_are_flattened() -> None:
    x, z = make_data(120, 5, 3, seed=3)
    flat = LeaceFitter(5, num_classes=3).update(x, z)
    shaped = LeaceFitter(5, num_classes=3).update(x.reshape(4, 30, 5), z.reshape(4, 30))
    assert rel(shaped.sigma_xz(), flat.sigma_xz()) < 1e-13
    eraser = flat.build()
    assert torch.allclose(eraser(x.reshape(4, 30, 5)).reshape(120, 5), eraser(x))


def test_fitter_state_dict_round_trip() -> None:
    x, z = make_data(300, 7, 3, offset=50, seed=4)
    fitter = LeaceFitter(7, num_classes=3).update(x, z)
    names = {"n", "shift_x", "shift_z", "sum_x", "sum_z", "sum_xx", "sum_xz", "sum_zz"}
    assert set(fitter.state_dict()) == names
    assert all(v.dtype == F64 for k, v in fitter.state_dict().items() if k != "n")
    clone = LeaceFitter(7, num_classes=3)
    clone.load_state_dict(fitter.state_dict())
    assert torch.equal(clone.build().projection(), fitter.build().projection())


# ---- the guarantee ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cond", "offset", "k"), [(1.0, 0.0, 2), (1e4, 1e4, 5), (1e8, 1e4, 4), (1e8, 0.0, 7)]
)
def test_cross_covariance_vanishes_float64(cond: float, offset: float, k: int) -> None:
    x, z = make_data(3000, 12, k, cond=cond, offset=offset, seed=5)
    eraser = LeaceFitter(12, num_classes=k).update(x, z).build()
    assert eraser.rank == k - 1
    assert residual(eraser, x, one_hot(z, k)) <= 1e-10


def test_cross_covariance_vanishes_float32() -> None:
    x, z = make_data(4000, 16, 4, cond=1e3, offset=10.0, seed=6)
    x32 = x.float()
    fitter = LeaceFitter(16, num_classes=4)
    for chunk, zz in zip(x32.split(512), z.split(512), strict=True):
        fitter.update(chunk, zz)
    eraser = fitter.build()
    assert eraser(x32).dtype == torch.float32
    assert residual(eraser, x32, one_hot(z, 4)) <= 1e-4


@pytest.mark.parametrize("method", ["leace", "orth"])
@pytest.mark.parametrize("affine", [True, False])
def test_idempotent_and_mean_preserving(method: str, affine: bool) -> None:
    x, z = make_data(2000, 10, 3, cond=1e3, offset=5.0, seed=7)
    eraser = LeaceFitter(10, num_classes=3, method=method, affine=affine).update(x, z).build()  # type: ignore[arg-type]
    once = eraser(x)
    assert rel(eraser(once), once) < 1e-12
    assert residual(eraser, x, one_hot(z, 3)) < 1e-10
    if affine:
        assert torch.allclose(once.mean(0), x.mean(0), rtol=0, atol=1e-10)


def _mean_sq_edit(eraser: Callable[[Tensor], Tensor], x: Tensor) -> float:
    return float((eraser(x) - x).pow(2).sum(1).mean())


def test_leace_edit_is_smallest() -> None:
    x, z = make_data(3000, 8, 3, cond=1e3, seed=8)
    leace = LeaceFitter(8, num_classes=3).update(x, z).build()
    orth = LeaceFitter(8, num_classes=3, method="orth").update(x, z).build()
    leace_mse, orth_mse = _mean_sq_edit(leace, x), _mean_sq_edit(orth, x)
    assert leace_mse < orth_mse
    # Any oblique projection P = B (M^T B)^{-1} M^T with B spanning Sigma_xz also zeroes the
    # cross-covariance; LEACE must beat all of them.
    mean, _, sxz = two_pass(x, one_hot(z, 3))
    b = torch.linalg.svd(sxz, full_matrices=False).U[:, :2]
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        m = torch.randn(8, 2, generator=g, dtype=F64)
        p = b @ torch.linalg.solve(m.T @ b, m.T)
        rand = LowRankEraser(b, m @ torch.linalg.solve(m.T @ b, torch.eye(2, dtype=F64)).T, mean)
        assert torch.allclose(rand.projection(), p)
        assert residual(rand, x, one_hot(z, 3)) < 1e-9
        assert leace_mse <= _mean_sq_edit(rand, x) + 1e-12


def test_label_encoding_invariance() -> None:
    x, z = make_data(1000, 9, 4, seed=9)
    ids = LeaceFitter(9, num_classes=4).update(x, z).build()
    hot = LeaceFitter(9, z_dim=4).update(x, one_hot(z, 4)).build()
    assert rel(hot.projection(), ids.projection()) < 1e-12
    assert torch.allclose(hot(x), ids(x), atol=1e-10)


def test_linear_probe_at_chance_after_erasure() -> None:
    sklearn = pytest.importorskip("sklearn.linear_model")
    d, k = 10, 3
    # One draw split in half: make_data takes the class means and rotation from the seed.
    x_all, z_all = make_data(12_000, d, k, cond=100, signal=0.6, seed=11)
    x, z, xt, zt = x_all[:6000], z_all[:6000], x_all[6000:], z_all[6000:]
    before = sklearn.LogisticRegression(max_iter=500).fit(x.numpy(), z.numpy())
    chance = float(torch.bincount(zt).max()) / len(zt)
    assert before.score(xt.numpy(), zt.numpy()) > chance + 0.2  # the concept is there

    eraser = LeaceFitter(d, num_classes=k).update(x, z).build()
    probe = sklearn.LogisticRegression(max_iter=500).fit(eraser(x).numpy(), z.numpy())
    acc = probe.score(eraser(xt).numpy(), zt.numpy())
    # 3.5 binomial standard errors around the majority rate (plus the estimation slack of
    # a probe that may pick a non-majority constant).
    half_width = 3.5 * math.sqrt(chance * (1 - chance) / len(zt)) + 0.01
    assert abs(acc - chance) <= half_width


# ---- agreement with the reference package ----------------------------------------------------


@pytest.mark.parametrize(
    ("k", "cond", "method"), [(2, 10.0, "leace"), (5, 1e4, "leace"), (4, 100.0, "orth")]
)
def test_matches_concept_erasure(k: int, cond: float, method: str) -> None:
    ce = pytest.importorskip("concept_erasure")
    d = 24
    x, z = make_data(4000, d, k, cond=cond, seed=12)
    ours = LeaceFitter(d, num_classes=k, method=method).update(x, z).build()  # type: ignore[arg-type]
    ref_fitter = ce.LeaceFitter(
        d,
        k,
        method=method,
        dtype=F64,
        shrinkage=False,
        svd_tol=1e-12,
        constrain_cov_trace=False,
    )
    ref_fitter.update(x, one_hot(z, k))
    ref = ref_fitter.eraser
    # The reference stores the *complement*: its P is I - (our projection).
    ref_proj = torch.eye(d, dtype=F64) - ref.P
    assert rel(ours.projection(), ref_proj) <= 1e-8
    out, ref_out = ours(x), ref(x)
    assert rel(out - x, ref_out - x) <= 1e-8


# ---- whitening paths, shrinkage, tolerance ---------------------------------------------------


def test_cholesky_and_eigh_paths_agree() -> None:
    x, z = make_data(2000, 15, 4, cond=1e6, offset=1e3, seed=13)
    fitter = LeaceFitter(15, num_classes=4, whitening="cholesky").update(x, z)
    chol = fitter.build()
    fitter.whitening = "eigh"
    eig = fitter.build()
    assert chol.info is not None and eig.info is not None
    assert (chol.info.whitening, eig.info.whitening) == ("cholesky", "eigh")
    assert rel(chol.projection(), eig.projection()) < 1e-9


def test_rank_deficient_features_use_pseudo_inverse() -> None:
    # n < d and an exactly duplicated feature: Sigma_xx is singular.
    x, z = make_data(40, 60, 3, seed=14)
    x = torch.cat([x, x[:, :1] * 2 - x[:, 1:2]], dim=1)
    eraser = LeaceFitter(61, num_classes=3).update(x, z).build()
    assert eraser.info is not None and eraser.info.whitening == "eigh"
    assert eraser.info.whitened_rank <= 39
    assert residual(eraser, x, one_hot(z, 3)) < 1e-9
    assert bool(torch.isfinite(eraser.projection()).all())
    with pytest.raises(CdistillError, match="positive definite"):
        LeaceFitter(61, num_classes=3, whitening="cholesky").update(x, z).build()


def test_whitener_detects_near_singular_cholesky() -> None:
    # Positive definite in floating point (Cholesky succeeds) but one eigenvalue is below
    # d * eps * lambda_max: "auto" must notice and fall back to the pseudo-inverse.
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=F64))
    evals = torch.logspace(0, -3, 50, dtype=F64)
    evals[-1] = 3e-15
    cov = (q * evals) @ q.T
    cov = (cov + cov.T) / 2
    assert int(torch.linalg.cholesky_ex(cov).info) == 0  # precondition of this test
    whitener = Whitener.from_cov(cov)
    assert (whitener.method, whitener.rank) == ("eigh", 49)
    evals[-1] = 1e-9  # comfortably conditioned: the cheap path is taken
    assert Whitener.from_cov((q * evals) @ q.T).method == "cholesky"


def test_oas_matches_sklearn() -> None:
    cov_mod = pytest.importorskip("sklearn.covariance")
    x, _ = make_data(40, 30, 2, cond=1e3, offset=7.0, seed=15)
    fitter = LeaceFitter(30).update(x, torch.randn(40, dtype=F64))
    expected = cov_mod.OAS().fit(x.numpy()).shrinkage_
    assert oas_shrinkage(fitter.sigma_xx(), 40) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("shrinkage", [True, 0.3])
def test_shrinkage_keeps_the_guarantee(shrinkage: bool | float) -> None:
    x, z = make_data(60, 40, 3, cond=1e4, seed=16)
    eraser = LeaceFitter(40, num_classes=3, shrinkage=shrinkage).update(x, z).build()
    assert eraser.info is not None and 0 < eraser.info.shrinkage <= 1
    assert residual(eraser, x, one_hot(z, 3)) < 1e-9
    plain = LeaceFitter(40, num_classes=3, whitening="eigh").update(x, z).build()
    assert rel(eraser.projection(), plain.projection()) > 1e-3  # shrinkage changed P


def test_relative_svd_tolerance_drops_and_reports_weak_directions() -> None:
    g = torch.Generator().manual_seed(17)
    n, d = 2000, 6
    zc = torch.randn(n, 2, generator=g, dtype=F64)
    zc = zc - zc.mean(0)
    noise = torch.randn(n, d, generator=g, dtype=F64)
    # Remove the sample correlation of the noise with z, so Cov(x, z) is exactly `mix`-shaped.
    noise -= zc @ torch.linalg.lstsq(zc, noise).solution
    # Relative: only the ratio of the two directions matters, not the overall strength of
    # the concept (an absolute tolerance drops a weak concept entirely) nor the units of x
    # and z.
    # (The strength stays well above rounding: Cov(noise, z) is ~1e-16, not exactly 0, and at a
    # strength near 1e-9 the 1e-9-weaker direction would sit at the 1e-7 tolerance itself.)
    for strength, x_scale, z_scale in ((1.0, 1.0, 1.0), (1e-4, 1e3, 1e-8), (1e-5, 1e-6, 1e4)):
        mix = torch.zeros(2, d, dtype=F64)
        mix[0, 0], mix[1, 1] = strength, strength * 1e-9  # second direction 1e-9 as strong
        x = noise + zc @ mix
        with pytest.warns(UserWarning, match="dropped 1"):
            fitter = LeaceFitter(d, z_dim=2, svd_tol=1e-7)
            eraser = fitter.update(x * x_scale, zc * z_scale).build()
        assert eraser.rank == 1 and eraser.info is not None and eraser.info.n_dropped == 1
        # The strong part is gone (the floor is rounding: Cov(x, z) is tiny at strength 1e-9).
        assert residual(eraser, x * x_scale, zc[:, :1]) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = noise + zc @ (torch.eye(2, d, dtype=F64) * torch.tensor([[1.0], [1e-9]], dtype=F64))
        full = LeaceFitter(d, z_dim=2, svd_tol=0.0).update(x, zc).build()
    assert full.rank == 2
    assert residual(full, x, zc) < 1e-9


def test_one_hot_redundancy_and_absent_class_are_not_reported_as_dropped() -> None:
    x, z = make_data(500, 8, 4, seed=18)
    z[z == 2] = 1  # class 2 never occurs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eraser = LeaceFitter(8, num_classes=4).update(x, z).build()
    assert eraser.rank == 2 and eraser.info is not None and eraser.info.n_dropped == 0


# ---- dtypes, apply, save/load ----------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_apply(dtype: torch.dtype, tol: float, affine: bool) -> None:
    x, z = make_data(1000, 32, 3, cond=10, offset=2.0, seed=19)
    eraser = LeaceFitter(32, num_classes=3, affine=affine).update(x, z).build()
    x32 = x.float()
    ref = eraser(x32)
    out = eraser(x32.to(dtype))
    assert out.dtype == dtype and out.shape == x.shape
    # Error budget: one rounding of the input and one of the output, relative to |x|.
    err = (out.float() - ref).abs().max() / x32.abs().max()
    assert err < tol
    x16 = eraser.half()(x32.to(dtype))  # buffers cast to half too: still runs
    assert bool(torch.isfinite(x16).all())


def test_eraser_state_dict_round_trip_resizes() -> None:
    x, z = make_data(800, 11, 4, offset=3.0, seed=20)
    eraser = LeaceFitter(11, num_classes=4).update(x, z).build()
    assert set(eraser.state_dict()) == {"proj_left", "proj_right", "bias"}
    assert eraser.proj_left.shape == (11, 3)
    fresh = LeaceEraser.identity(11)  # rank 0: buffers must be resized on load
    fresh.load_state_dict(eraser.state_dict())
    assert torch.equal(fresh(x), eraser(x))
    container = torch.nn.Sequential(LowRankEraser.identity(11))
    container.load_state_dict({f"0.{k}": v for k, v in eraser.state_dict().items()})
    assert torch.equal(container(x), eraser(x))


def test_dimension_mismatch_names_both_dims() -> None:
    x, z = make_data(100, 6, 2, seed=21)
    eraser = LeaceFitter(6, num_classes=2).update(x, z).build()
    with pytest.raises(CdistillError, match=r"d=6.*last dim 7"):
        eraser(torch.randn(3, 7, dtype=F64))
    with pytest.raises(CdistillError, match="last dim 6; got shape"):
        LeaceFitter(6, num_classes=2).update(torch.randn(3, 5), torch.tensor([0, 1, 0]))


# ---- bad inputs ------------------------------------------------------------------------------


def test_non_finite_inputs_raise() -> None:
    x, z = make_data(50, 4, 2, seed=22)
    bad = x.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(CdistillError, match="x holds 1 non-finite"):
        LeaceFitter(4, num_classes=2).update(bad, z)
    bad[3, 1] = float("inf")
    with pytest.raises(CdistillError, match="non-finite"):
        LeaceFitter(4, num_classes=2).update(bad.float(), z)
    zf = z.to(F64)
    zf[0] = float("nan")
    with pytest.raises(CdistillError, match="z holds 1 non-finite"):
        LeaceFitter(4).update(x, zf)
    fitter = LeaceFitter(4, num_classes=2)
    with pytest.raises(CdistillError):
        fitter.update(bad, z)
    assert fitter.count == 0  # a rejected batch leaves no trace


def test_integer_labels_need_a_class_count() -> None:
    x, z = make_data(50, 4, 3, seed=23)
    with pytest.raises(CdistillError, match="num_classes"):
        LeaceFitter(4).update(x, z)
    with pytest.raises(CdistillError, match=r"\[0, 2\)"):
        LeaceFitter(4, num_classes=2).update(x, z)
    with pytest.warns(UserWarning, match="class ids stored as floats"):
        LeaceFitter(4).update(x, z.to(F64))


def test_too_few_samples_and_constant_concept_raise() -> None:
    x, z = make_data(50, 4, 3, seed=24)
    with pytest.raises(CdistillError, match="at least 2 samples"):
        LeaceFitter(4, num_classes=3).update(x[:1], z[:1]).build()
    with pytest.raises(CdistillError, match="at least 2 samples"):
        LeaceFitter(4, num_classes=3).build()
    with pytest.raises(CdistillError, match="constant"):
        LeaceFitter(4, num_classes=3).update(x, torch.zeros(50, dtype=torch.long)).build()
    with pytest.raises(CdistillError, match="constant"):
        LeaceFitter(4).update(x, torch.full((50,), 0.1, dtype=F64)).build()


def test_uninformative_features_give_identity_with_warning() -> None:
    _, z = make_data(50, 4, 3, seed=25)
    x = torch.ones(50, 4, dtype=F64) * 3.0
    with pytest.warns(UserWarning, match="no linear information"):
        eraser = LeaceFitter(4, num_classes=3).update(x, z).build()
    assert eraser.rank == 0
    probe = torch.randn(5, 4, dtype=F64)
    assert torch.equal(eraser(probe), probe)


def test_bad_configuration_raises() -> None:
    with pytest.raises(CdistillError, match="method"):
        LeaceFitter(4, method="pca")  # type: ignore[arg-type]
    with pytest.raises(CdistillError, match="z_dim"):
        LeaceFitter(4, z_dim=3, num_classes=4)
    with pytest.raises(CdistillError, match="svd_tol"):
        LeaceFitter(4, svd_tol=2.0)
    with pytest.raises(CdistillError, match="merge"):
        LeaceFitter(4).merge(LeaceFitter(5))


# ---- oracle LEACE ----------------------------------------------------------------------------


def test_oracle_eraser_is_the_regression_residual() -> None:
    x, z = make_data(3000, 10, 4, cond=1e3, offset=1e3, seed=26)
    fitter = LeaceFitter(10, num_classes=4).update(x, z)
    oracle = build_oracle(fitter)
    assert isinstance(oracle, OracleEraser)
    out = oracle(x, z)
    # Independent check: least-squares regression of centred x on centred one-hot z.
    zc = one_hot(z, 4)[:, :3]
    zc = zc - zc.mean(0)
    beta = torch.linalg.lstsq(zc, x - x.mean(0)).solution
    expected = x - zc @ beta
    assert rel(out - x, expected - x) < 1e-9
    assert residual(lambda t: oracle(t, z), x, one_hot(z, 4)) < 1e-10
    # Knowing z allows a smaller edit than LEACE.
    leace = fitter.build()
    assert _mean_sq_edit(lambda t: oracle(t, z), x) < _mean_sq_edit(leace, x)
    half = oracle(x.half(), z)
    assert half.dtype == torch.float16
    with pytest.raises(CdistillError, match="num_classes"):
        build_oracle(LeaceFitter(10, z_dim=4).update(x, one_hot(z, 4)))(x, z)


# ---- DDP -------------------------------------------------------------------------------------


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, z = make_data(300, 5, 3, offset=1e4, seed=27)
    # Unequal shards with different first-batch shifts; rank 1 also gets an empty batch.
    shard = slice(0, 70) if rank == 0 else slice(70, 300)
    fitter = LeaceFitter(5, num_classes=3).update(x[shard], z[shard])
    fitter.update(x[:0], z[:0])
    fitter.all_reduce_()
    torch.save(fitter.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_all_reduce_sums_statistics_across_ranks(tmp_path: os.PathLike[str]) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path) + "/init", str(tmp_path)), nprocs=2, join=True)
    states = [torch.load(os.path.join(tmp_path, f"rank{r}.pt")) for r in range(2)]
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    x, z = make_data(300, 5, 3, offset=1e4, seed=27)
    full = LeaceFitter(5, num_classes=3).update(x, z)
    reduced = LeaceFitter(5, num_classes=3)
    reduced.load_state_dict(states[0])
    assert reduced.count == 300
    assert rel(reduced.sigma_xx(), full.sigma_xx()) < 1e-10
    assert rel(reduced.sigma_xz(), full.sigma_xz()) < 1e-10
    assert rel(reduced.build().projection(), full.build().projection()) < 1e-8


def test_all_reduce_without_process_group_is_a_no_op() -> None:
    x, z = make_data(30, 3, 2, seed=28)
    fitter = LeaceFitter(3, num_classes=2).update(x, z)
    before = {k: v.clone() for k, v in fitter.state_dict().items()}
    fitter.all_reduce_()
    assert all(torch.equal(before[k], v) for k, v in fitter.state_dict().items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fit_and_apply_match_cpu() -> None:
    x, z = make_data(2000, 64, 5, cond=1e4, offset=1e3, seed=29)
    cpu = LeaceFitter(64, num_classes=5).update(x.float(), z)
    gpu = LeaceFitter(64, num_classes=5, device="cuda")
    for chunk, zz in zip(x.float().cuda().split(300), z.cuda().split(300), strict=True):
        gpu.update(chunk, zz)
    gpu.all_reduce_()
    e_cpu, e_gpu = cpu.build(), gpu.build()
    assert e_gpu.proj_left.is_cuda
    assert rel(e_gpu.projection().cpu(), e_cpu.projection()) < 1e-8
    out = e_gpu(x.cuda().bfloat16())
    assert out.dtype == torch.bfloat16 and out.is_cuda
    assert residual(e_gpu, x.cuda(), one_hot(z, 5).cuda()) < 1e-6


@pytest.mark.parametrize("channels, rank, spatial", [(6, 2, (5, 7)), (40, 2, (3, 3)), (12, 3, (9,))])
def test_erase_channels_equals_rows(channels: int, rank: int, spatial: tuple[int, ...]) -> None:
    # Dense branch (C <= 8r), low-rank branch (C > 8r) and a 1-D map all equal the row form.
    g = torch.Generator().manual_seed(21)
    left, right = torch.randn(channels, rank, generator=g), torch.randn(channels, rank, generator=g)
    eraser = LowRankEraser(left, right, torch.randn(channels, generator=g))
    x = torch.randn(4, channels, *spatial, generator=g, dtype=F64)
    expected = eraser(x.movedim(1, -1)).movedim(-1, 1)
    got = eraser.erase_channels(x)
    assert got.shape == x.shape and got.dtype == x.dtype
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    half = eraser.erase_channels(x.float().half())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), expected, rtol=1e-2, atol=2e-2)
    with pytest.raises(CdistillError, match=f"d={channels} channels"):
        eraser.erase_channels(x[:, :-1])
