"""Directional derivatives, TCAV scores, significance tests and corrections."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from itertools import pairwise
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch import Tensor, nn

from cdistill.concepts.tcav import (
    benjamini_hochberg,
    directional_derivatives,
    holm,
    run_tcav,
    target_gradients,
    tcav_score,
    tcav_significance,
)
from cdistill.errors import CdistillError

D = 16


def mlp(seed: int = 0, batchnorm: bool = False) -> Any:  # nn.Sequential with named children
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            feat=nn.Linear(8, D),
            bn=nn.BatchNorm1d(D) if batchnorm else nn.Identity(),
            act=nn.Tanh(),
            hidden=nn.Linear(D, 32),
            relu=nn.ReLU(),
            head=nn.Linear(32, 3),
        )
    )


def linear_head(w: Tensor) -> nn.Sequential:
    """Activation = input (layer ``feat``); logits ``[0, w·a]``."""
    head = nn.Linear(D, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.stack([torch.zeros(D), w]))
    return nn.Sequential(OrderedDict(feat=nn.Identity(), head=head))


def test_planted_cav_scores_one_and_its_opposite_zero() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(D, generator=g)
    model = linear_head(w)
    x = torch.randn(50, D, generator=g)
    grads = target_gradients(model, "feat", x, labels=1, target="logit")
    derivs = directional_derivatives(grads, w / w.norm())
    torch.testing.assert_close(derivs, torch.full((50,), float(w.norm())))  # ∇_a (w·a) = w
    assert tcav_score(derivs) == 1.0
    assert tcav_score(directional_derivatives(grads, -w)) == 0.0


def test_random_cavs_score_about_one_half() -> None:
    model = mlp()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 8, generator=g)
    cavs = torch.randn(40, D, generator=g)
    cavs /= cavs.norm(dim=1, keepdim=True)
    grads = target_gradients(model, "feat", x, labels=2)
    derivs = directional_derivatives(grads, cavs)  # [200, 40]
    assert derivs.shape == (200, 40)
    scores = torch.tensor([tcav_score(derivs[:, i]) for i in range(40)])
    assert abs(float(scores.mean()) - 0.5) < 0.1
    # Opposite directions split the inputs exactly.
    opposite = directional_derivatives(grads, -cavs[0])
    assert tcav_score(derivs[:, 0]) + tcav_score(opposite) == pytest.approx(1.0)


def test_batched_gradients_are_exact_per_sample_and_mode_is_restored() -> None:
    model = mlp(batchnorm=True)
    model.train()  # batch norm in train mode would couple samples; TCAV must use eval
    with torch.no_grad():
        model.bn.running_mean.normal_()
    x = torch.randn(6, 8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    batched = target_gradients(model, "feat", x, labels, "logprob")
    singles = torch.cat([target_gradients(model, "feat", x[i : i + 1], labels[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(batched, singles)
    chunked = target_gradients(model, "feat", x, labels, batch_size=4)
    torch.testing.assert_close(chunked, batched)
    assert model.training and model.bn.training
    # Reference by hand: autograd through the eval-mode tail of the network.
    model.eval()
    a = model.feat(x).detach().requires_grad_(True)
    logp = torch.log_softmax(model.head(model.relu(model.hidden(model.act(model.bn(a))))), 1)
    (ref,) = torch.autograd.grad(logp.gather(1, labels[:, None]).sum(), a)
    torch.testing.assert_close(batched, ref)


def test_works_for_a_frozen_model_under_no_grad() -> None:
    model = mlp().requires_grad_(False)
    with torch.no_grad():
        grads = target_gradients(model, "hidden", torch.randn(4, 8), 0, "logit")
    assert grads.shape == (4, 32) and grads.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_callable_target_prototype_loss_gradient() -> None:
    model = mlp()
    center = torch.randn(D)

    def proto_loss(act: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
        return (act - center).pow(2).sum(1) / D

    x = torch.randn(5, 8)
    grads = target_gradients(model, "feat", x, None, proto_loss)
    torch.testing.assert_close(grads, 2 * (model.feat(x).detach() - center) / D)
    with pytest.raises(CdistillError, match="one value per sample"):
        target_gradients(model, "feat", x, None, lambda a, lg, y: a.sum())


def test_errors() -> None:
    model = mlp()
    x = torch.randn(3, 8)
    with pytest.raises(CdistillError, match="needs labels"):
        target_gradients(model, "feat", x)
    with pytest.raises(CdistillError, match="logprob"):
        target_gradients(model, "feat", x, 0, "logprb")
    with pytest.raises(CdistillError, match=r"d=5 but the target gradients have shape \(3, 16\)"):
        directional_derivatives(target_gradients(model, "feat", x, 0), torch.ones(5))
    with pytest.raises(CdistillError, match="feat"):
        target_gradients(model, "fet", x, 0)
    with pytest.raises(CdistillError, match="No directional"):
        tcav_score(torch.zeros(0))


def test_significance_matches_scipy_and_cohens_d() -> None:
    a = [0.9, 0.8, 0.85, 0.95, 0.7]
    b = [0.5, 0.4, 0.6, 0.55, 0.45, 0.5]
    t, p, d = tcav_significance(a, b)
    ref = stats.ttest_ind(a, b)
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)
    # Cohen's d by hand: mean difference over the pooled standard deviation.
    ma, mb = sum(a) / 5, sum(b) / 6
    va = sum((v - ma) ** 2 for v in a) / 4
    vb = sum((v - mb) ** 2 for v in b) / 5
    assert d == pytest.approx((ma - mb) / ((4 * va + 5 * vb) / 9) ** 0.5)
    welch = tcav_significance(a, b, equal_var=False)
    assert welch.p == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue)
    one_constant = tcav_significance([1.0, 1.0, 1.0], b, equal_var=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's cancellation warning
        ref_p = stats.ttest_ind([1.0] * 3, b, equal_var=False).pvalue
    assert one_constant.p == pytest.approx(ref_p)
    assert tcav_significance([1.0, 1.0], [0.5, 0.5]) == (float("inf"), 0.0, float("inf"))
    assert tcav_significance([0.5, 0.5], [0.5, 0.5]) == (0.0, 1.0, 0.0)
    with pytest.raises(CdistillError, match="at least 2"):
        tcav_significance([0.5], [0.4, 0.6])


def test_holm_and_benjamini_hochberg_on_known_inputs() -> None:
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm: sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> cummax.
    assert holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: m p / rank = 0.02, 0.02, 0.04, 0.04 -> reverse cummin.
    assert benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])
    q = [0.01, 0.02, 0.025, 0.9]
    # BH: 0.04, 0.04, 0.0333, 0.9 -> the third value pulls the first two down.
    assert benjamini_hochberg(q) == pytest.approx([1 / 30, 1 / 30, 1 / 30, 0.9])
    assert holm(q) == pytest.approx([0.04, 0.06, 0.06, 0.9])
    assert holm([0.3, 0.6]) == pytest.approx([0.6, 0.6])  # capped by monotonicity, not > 1
    assert holm([0.7, 0.8]) == pytest.approx([1.0, 1.0])
    assert holm([]) == [] and benjamini_hochberg([]) == []


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=20))
def test_corrections_are_valid_adjustments(pvals: list[float]) -> None:
    h, b = holm(pvals), benjamini_hochberg(pvals)
    for raw, adj_h, adj_b in zip(pvals, h, b, strict=True):
        assert raw <= adj_b + 1e-12 and adj_b <= adj_h + 1e-12 and adj_h <= 1.0
    order = sorted(range(len(pvals)), key=lambda i: pvals[i])
    assert all(h[i] <= h[j] + 1e-12 for i, j in pairwise(order))  # monotone
    assert all(b[i] <= b[j] + 1e-12 for i, j in pairwise(order))


def random_sets(n_sets: int, n: int, seed: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D, generator=g) for _ in range(n_sets)]


def test_run_tcav_planted_concept_is_significant() -> None:
    torch.manual_seed(0)
    model = mlp(seed=3)
    x = torch.randn(100, 8)
    labels = torch.full((100,), 1)
    # Plant the concept along the mean gradient of the class-1 log-probability.
    grads = target_gradients(model, "feat", x, labels, "logprob")
    direction = grads.mean(0)
    direction /= direction.norm()
    randoms = random_sets(8, 60, seed=1)
    concept = torch.randn(60, D) + 4 * direction
    result = run_tcav(grads, "feat", concept, randoms, "logistic", n_runs=6)
    assert len(result.scores) == len(result.random_scores) == 6
    assert result.mean > 0.8 and result.p_value < 0.01 and result.effect_size > 1
    assert result.significant()
    assert min(result.cav_accuracies) > 0.85


def test_run_tcav_random_concept_is_not_significant() -> None:
    # The runs share one concept set, so under this null p < 0.05 happens more often than
    # 5% (a known property of the TCAV test): check the typical p-value over seeds.
    model = mlp(seed=3)
    p_values = []
    for seed in range(10):
        torch.manual_seed(seed)
        x = torch.randn(100, 8)
        randoms = random_sets(9, 60, seed=100 + seed)
        grads = target_gradients(model, "feat", x, 1, "logprob")
        result = run_tcav(grads, "feat", randoms[8], randoms[:8], "mean_diff")
        p_values.append(result.p_value)
        assert 0.0 <= result.mean <= 1.0 and len(result.scores) == 8
    assert float(torch.tensor(p_values).median()) > 0.1
    assert sum(p < 0.01 for p in p_values) <= 3


def test_run_tcav_gate_and_errors() -> None:
    model = mlp(seed=3)
    grads = target_gradients(model, "feat", torch.randn(20, 8), 1)
    randoms = random_sets(5, 30, seed=0)
    with pytest.warns(UserWarning, match="Dropping the CAV"), pytest.raises(CdistillError, match="not linearly"):
        run_tcav(grads, "feat", randoms[4], randoms[:4], "mean_diff", min_accuracy=0.9)
    with pytest.raises(CdistillError, match="at least 2 random"):
        run_tcav(grads, "feat", randoms[4], randoms[:1])
    with pytest.raises(CdistillError, match="n_runs"):
        run_tcav(grads, "feat", randoms[4], randoms[:4], n_runs=5)
    with pytest.raises(CdistillError, match=rf"d={D} but the target gradients have shape \(20, 5\)"):
        run_tcav(grads[:, :5], "feat", randoms[4], randoms[:4])  # not the CAVs' layer
