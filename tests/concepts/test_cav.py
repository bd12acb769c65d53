"""CAV solvers, held-out evaluation, the accuracy gate and the CAV bank."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

import cdistill.concepts.cav as cav
from cdistill.concepts.cav import (
    CAVBank,
    CAVResult,
    fit_cav,
    fit_linear,
    gate_cavs,
    position_rows,
    stratified_split,
)
from cdistill.errors import CdistillError

SOLVERS = ["logistic", "svm", "ridge", "mean_diff"]


def planted(d: int, n: int, shift: float, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """Isotropic Gaussians whose means differ by ``shift`` along a unit vector ``u``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    offset = 3 * torch.randn(d, generator=g)  # a common mean the solvers must centre away
    pos = torch.randn(n, d, generator=g) + shift * u + offset
    neg = torch.randn(n, d, generator=g) + offset
    return pos, neg, u


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_recover_planted_direction(solver: str) -> None:
    pos, neg, u = planted(d=8, n=2000, shift=2.0, seed=0)
    result = fit_cav(pos, neg, solver)
    assert float(result.vector @ u) > 0.99
    assert torch.linalg.vector_norm(result.vector).item() == pytest.approx(1.0, abs=1e-5)
    assert 0.8 < result.accuracy < 0.9  # Bayes accuracy Φ(1) ≈ 0.84


@pytest.mark.parametrize("solver", SOLVERS)
def test_solvers_recover_planted_direction_when_d_exceeds_n(solver: str) -> None:
    # d > n takes the Gram-matrix reduction path; strong regularisation averages the noise.
    pos, neg, u = planted(d=400, n=150, shift=40.0, seed=1)
    options: dict[str, dict[str, Any]] = {
        "logistic": {"C": 1e-3}, "svm": {"C": 1e-4}, "ridge": {"alpha": 1e4}
    }
    result = fit_cav(pos, neg, solver, **options.get(solver, {}))
    assert float(result.vector @ u) > 0.99
    assert result.accuracy == 1.0


@pytest.mark.parametrize("solver", SOLVERS)
def test_cav_points_towards_the_concept(solver: str) -> None:
    pos, neg, _ = planted(d=30, n=100, shift=1.5, seed=2)
    v = fit_cav(pos, neg, solver).vector
    assert float(pos.mean(0) @ v) > float(neg.mean(0) @ v)
    # Swapping the roles of the sets (same training data) flips the CAV exactly.
    v_all = fit_cav(pos, neg, solver, test_fraction=0.0).vector
    flipped = fit_cav(neg, pos, solver, test_fraction=0.0).vector
    torch.testing.assert_close(flipped, -v_all, atol=1e-4, rtol=0)


@pytest.mark.parametrize("d", [200, 50])
def test_solutions_match_sklearn_objectives(d: int) -> None:
    # d=200 > n=120 runs the Gram reduction, d=50 the direct solve: both must give the
    # optimum of the same objective as scikit-learn on the same globally scaled features.
    linear_model = pytest.importorskip("sklearn.linear_model")
    svm = pytest.importorskip("sklearn.svm")
    g = torch.Generator().manual_seed(4)
    pos = torch.randn(60, d, generator=g, dtype=torch.float64) + 0.3
    neg = torch.randn(60, d, generator=g, dtype=torch.float64)
    x = torch.cat([pos, neg])
    xc = x - x.mean(0)
    xs = (xc / xc.pow(2).mean().sqrt()).numpy()
    y = np.r_[np.ones(60), np.zeros(60)]
    for C in (1.0, 0.01):
        v, _ = fit_linear(pos, neg, "logistic", C=C)
        ref = linear_model.LogisticRegression(C=C, tol=1e-12, max_iter=100_000).fit(xs, y)
        w = torch.from_numpy(ref.coef_[0])
        assert float(v @ w / w.norm()) > 0.99999
        v, _ = fit_linear(pos, neg, "svm", C=C)
        # A huge intercept_scaling makes liblinear's penalised intercept effectively free.
        ref_svm = svm.LinearSVC(C=C, dual=False, tol=1e-12, max_iter=10_000, intercept_scaling=1e3)
        w = torch.from_numpy(ref_svm.fit(xs, y).coef_[0])
        assert float(v @ w / w.norm()) > 0.9999
    ridge = linear_model.Ridge(alpha=3.0).fit(xs, 2 * y - 1)
    v, _ = fit_linear(pos, neg, "ridge", alpha=3.0)
    w = torch.from_numpy(ridge.coef_)
    assert float(v @ w / w.norm()) > 0.99999


def junk_direction_data(d: int, n: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Float32 activations whose largest-variance direction (std 300 vs 1) carries no
    concept information; the concept shifts the mean by 0.4 along ``u``, orthogonal to it."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    junk = torch.randn(d, generator=g)
    junk -= (junk @ u) * u
    junk /= junk.norm()

    def sample(shift: float) -> Tensor:
        x = torch.randn(n, d, generator=g) + 3.0 + shift * u
        return x + 300 * torch.randn(n, 1, generator=g) * junk

    return sample(0.4), sample(0.0), junk


@pytest.mark.parametrize("solver", ["logistic", "svm", "ridge"])
@pytest.mark.parametrize("n", [40, 140, 149, 300])  # 2n rows vs d = 300: n << d, near d, > d
@pytest.mark.parametrize("path", ["gram", "rows"])
def test_float32_fit_matches_float64_optimum(
    solver: str, n: int, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Float32 activations (what collect_activations returns) must give the float64 optimum
    # on the same data, by either solution path, although rounding at float32 level is
    # larger than the informative part of the spectrum here.
    pos, neg, junk = junk_direction_data(d=300, n=n)
    v64, _ = fit_linear(pos.double(), neg.double(), solver)
    monkeypatch.setattr(
        cav, "_gram_is_cheaper", lambda n, d, solver: path == "gram" and d > n, raising=False
    )
    v32, b32 = fit_linear(pos, neg, solver)
    assert v32.dtype == b32.dtype == torch.float32
    assert float(v32.double() @ v64) > 0.9999
    assert abs(float(v32 @ junk)) < 0.5  # the junk direction did not become the CAV


def test_iterative_path_when_n_approaches_d(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows close to the dimension: no n x n Gram matrix / eigendecomposition (O(n²d + n³)).
    for solver in ("logistic", "svm", "ridge"):
        assert cav._gram_is_cheaper(700, 25088, solver)  # few rows of many features
        assert not cav._gram_is_cheaper(20_000, 25088, solver)
        assert not cav._gram_is_cheaper(4000, 3200, solver)  # n > d
    assert not cav._gram_is_cheaper(2100, 3200, "logistic")

    def no_eigh(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("eigendecomposition of the Gram matrix")

    monkeypatch.setattr(torch.linalg, "eigh", no_eigh)
    pos, neg, junk = junk_direction_data(d=1000, n=450)
    v, _ = fit_linear(pos, neg, "logistic")
    assert abs(float(v @ junk)) < 0.5


def test_heldout_accuracy_agrees_with_sklearn_on_the_same_split() -> None:
    sklearn = pytest.importorskip("sklearn.linear_model")
    g = torch.Generator().manual_seed(0)
    d, n = 100, 300
    basis = torch.randn(5, d, generator=g)
    u = torch.randn(d, generator=g)
    u /= u.norm()

    def sample(shift: float) -> Tensor:  # ReLU of a low-rank signal plus noise
        low_rank = torch.randn(n, 5, generator=g) @ basis
        return torch.relu(low_rank + shift * u + torch.randn(n, d, generator=g))

    pos, neg = sample(2.5), sample(0.0)
    result = fit_cav(pos, neg, "logistic", seed=7)
    p_tr, p_te, n_tr, n_te = stratified_split(n, n, 0.3, seed=7)
    x_tr = torch.cat([pos[p_tr], neg[n_tr]]).numpy()
    y_tr = np.r_[np.ones(len(p_tr)), np.zeros(len(n_tr))]
    x_te = torch.cat([pos[p_te], neg[n_te]]).numpy()
    y_te = np.r_[np.ones(len(p_te)), np.zeros(len(n_te))]
    ref = sklearn.LogisticRegression(max_iter=5000).fit(x_tr, y_tr).score(x_te, y_te)
    assert 0.65 < result.accuracy < 0.95  # not a trivial problem
    assert abs(result.accuracy - ref) <= 0.02
    assert result.n_test == len(y_te) and result.n_train == len(y_tr)


def test_split_is_stratified_and_accuracies_consistent() -> None:
    pos, neg, _ = planted(d=5, n=50, shift=1.0, seed=6)
    result = fit_cav(pos[:40], neg, "mean_diff", test_fraction=0.25)
    assert result.n_test == 10 + 12 and result.n_train == 30 + 38
    overall = (10 * result.accuracy_pos + 12 * result.accuracy_neg) / 22
    assert result.accuracy == pytest.approx(overall)
    p_tr, p_te, n_tr, n_te = stratified_split(40, 50, 0.25, seed=0)
    assert len(set(p_tr.tolist()) | set(p_te.tolist())) == 40
    assert not set(p_tr.tolist()) & set(p_te.tolist())
    assert (len(n_tr), len(n_te)) == (38, 12)
    everything = fit_cav(pos, neg, "ridge", test_fraction=0.0)
    assert everything.n_test == 0 and everything.accuracy == everything.train_accuracy


def test_clear_errors() -> None:
    pos, neg, _ = planted(d=5, n=10, shift=1.0, seed=0)
    with pytest.raises(CdistillError, match=r"concept 'red'.*0 activations"):
        fit_cav(pos[:0], neg, concept="red")
    with pytest.raises(CdistillError, match=r"negative 'random3'.*0 activations"):
        fit_cav(pos, neg[:0], negative="random3")
    with pytest.raises(CdistillError, match="at least 2"):
        fit_cav(pos[:1], neg)
    with pytest.raises(CdistillError, match=r"d=5.*d=4"):
        fit_cav(pos, neg[:, :4])
    with pytest.raises(CdistillError, match="logistic"):
        fit_cav(pos, neg, "logistc")
    with pytest.raises(CdistillError, match="same mean"):
        fit_cav(pos, pos.clone(), "mean_diff", test_fraction=0.0)


def test_gate_warns_and_drops() -> None:
    good = fit_cav(*planted(d=4, n=100, shift=4.0, seed=0)[:2], concept="stripes", layer="layer3")
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(200, 4, generator=g)
    bad = fit_cav(noise[:100], noise[100:], concept="red", layer="layer4")
    assert bad.accuracy < 0.7 <= good.accuracy
    with pytest.warns(UserWarning, match=r"'red'.*'layer4'.*accuracy 0\.\d+"):
        kept = gate_cavs([good, bad])
    assert kept == [good]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gate_cavs([good]) == [good]


def make_result(concept: str, layer: str, negative: str = "random0", d: int = 6) -> CAVResult:
    v = torch.randn(d)
    return CAVResult(v / v.norm(), 0.25, 0.9, 0.8, 1.0, 0.95, 10, 4, "logistic", concept, negative, layer)


def test_bank_lookups_and_errors() -> None:
    torch.manual_seed(0)
    bank = CAVBank([make_result("red", "l4"), make_result("red", "l3"), make_result("old", "l4")])
    assert len(bank) == 3 and bank.vectors.shape == (3, 6) and bank.dim == 6
    torch.testing.assert_close(bank.vector("red", "l3"), bank.vectors[1])
    names, vecs = bank.at_layer("l4")
    assert names == ["red", "old"] and vecs.shape == (2, 6)
    assert bank.indices("red") == [0, 1]
    with pytest.raises(CdistillError, match="pass layer="):
        bank.vector("red")
    with pytest.raises(CdistillError, match=r"'rde'.*Close names: red"):
        bank.vector("rde")
    with pytest.raises(CdistillError, match="No CAV of concept 'old'"):
        bank.vector("old", "l3")
    with pytest.raises(CdistillError, match="one CAVBank per layer"):
        bank.add(make_result("blue", "l2", d=7))


def test_bank_save_load_bitwise_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bank = CAVBank([make_result("red", "l4"), make_result("old", "l4", "random1")])
    path = tmp_path / "cavs.pt"
    bank.save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["concepts"] == ["red", "old"]
    loaded = CAVBank.load(path)
    for name in ("vectors", "biases", "accuracies"):
        assert torch.equal(getattr(loaded, name), getattr(bank, name))
    assert loaded.negatives == ["random0", "random1"] and loaded.layers == ["l4", "l4"]
    assert loaded.solvers == ["logistic", "logistic"]


def test_bank_state_dict_round_trip_keeps_metadata(tmp_path: Path) -> None:
    torch.manual_seed(0)
    bank = CAVBank([make_result("red", "l4"), make_result("old", "l3")])
    # As a Lightning checkpoint would: nested in a module, saved, loaded weights_only.
    holder = torch.nn.Module()
    holder.cavs = bank
    torch.save({"state_dict": holder.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["state_dict"]
    fresh = torch.nn.Module()
    fresh.cavs = CAVBank()  # empty: adopts the checkpoint's shapes
    fresh.load_state_dict(state)
    assert torch.equal(fresh.cavs.vectors, bank.vectors)
    assert fresh.cavs.concepts == ["red", "old"] and fresh.cavs.layers == ["l4", "l3"]
    torch.testing.assert_close(fresh.cavs.vector("old"), bank.vectors[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_solvers_run_on_gpu() -> None:
    pos, neg, u = planted(d=400, n=150, shift=40.0, seed=1)
    for solver in SOLVERS:
        result = fit_cav(pos.cuda(), neg.cuda(), solver)
        assert result.vector.is_cuda
        assert float(result.vector.cpu() @ u) > 0.95


def test_position_rows_recover_a_planted_channel_direction() -> None:
    """Conv maps whose content positions carry a channel direction ``u`` (concept) or not
    (negative), on a background equal to the blank image's activation: the rows keep only
    the content positions, and a CAV on them recovers ``u``."""
    g = torch.Generator().manual_seed(0)
    n, c, h, w = 60, 6, 8, 8
    u = torch.randn(c, generator=g)
    u /= u.norm()
    blank = 0.1 * torch.randn(c, h, w, generator=g)  # small: the noise stays isotropic

    def maps(shift: float) -> Tensor:
        x = blank.expand(n, c, h, w).clone()
        content = torch.rand(n, 1, h, w, generator=g) < 0.3
        x = x + content * (torch.randn(n, c, h, w, generator=g) + 2.0 + shift * u.view(1, c, 1, 1))
        return x

    pos, neg = maps(3.0), maps(0.0)
    rows_pos = position_rows(pos, blank, threshold=0.1, max_rows=None)
    rows_neg = position_rows(neg, blank, threshold=0.1, max_rows=None)
    assert rows_pos.shape[1] == c
    # about 30% of the positions are content; the background ones are dropped
    assert 0.2 * n * h * w < len(rows_pos) < 0.4 * n * h * w
    res = fit_cav(rows_pos, rows_neg, "logistic")
    assert float(res.vector @ u) > 0.98
    assert res.accuracy > 0.8
    # without the blank every position is a row (background rows dilute the concept)
    assert len(position_rows(pos, None, max_rows=None)) == n * h * w
    # max_rows: a seeded subset
    sub = position_rows(pos, blank, max_rows=50, seed=3)
    assert len(sub) == 50 and torch.equal(sub, position_rows(pos, blank, max_rows=50, seed=3))
    with pytest.raises(CdistillError, match="conv maps"):
        position_rows(pos.reshape(n, -1))
