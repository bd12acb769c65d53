"""The bias's LEACE subspace (cdistill.causal.bias_span): group balancing, guardedness, the
pass through a model, errors, and the reliance measure's ``subspace=leace``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cdistill.causal import concept_ablation
from cdistill.causal.bias_span import BiasSpanFitter, bias_leace_span
from cdistill.causal.subspace import orthonormal_span
from cdistill.errors import CdistillError

K, D = 3, 12  # classes = bias values; rows: 3 label coordinates, 3 bias coordinates, 6 of noise


def _planted(n: int = 3000, aligned: float = 0.9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``[n, D]`` carrying the label in coordinates 0-2 and the bias in 3-5; the bias equals
    the label on an ``aligned`` share of the inputs (every group still occurs)."""
    gen = torch.Generator().manual_seed(seed)
    label = torch.randint(0, K, (n,), generator=gen)
    other = (label + torch.randint(1, K, (n,), generator=gen)) % K
    bias = torch.where(torch.rand(n, generator=gen) < aligned, label, other)
    rows = 0.3 * torch.randn(n, D, generator=gen, dtype=torch.float64)
    rows[torch.arange(n), label] += 2.0
    rows[torch.arange(n), K + bias] += 1.0
    return rows, label, bias


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(orthonormal_span(a).T @ orthonormal_span(b))


def test_balanced_span_is_the_bias_not_the_correlated_label() -> None:
    rows, label, bias = _planted()
    fitter = BiasSpanFitter(D, K, K)
    for i in range(0, len(rows), 500):  # streamed
        fitter.update(rows[i : i + 500], label[i : i + 500], bias[i : i + 500])
    span = fitter.span()
    truth = torch.zeros(D, K - 1, dtype=torch.float64)  # bias contrasts: e_{K+b} - e_{K}
    for b in range(1, K):
        truth[K + b, b - 1], truth[K, b - 1] = 1.0, -1.0
    assert span.shape == (D, K - 1)
    assert bool((_cosines(span, truth) > 0.99).all())
    label_dirs = torch.eye(D, dtype=torch.float64)[:, :K]
    assert float(_cosines(span, label_dirs).max()) < 0.15
    # Without balancing (the plain cross-covariance), the correlated label leaks in: the test
    # above could fail.
    onehot = torch.nn.functional.one_hot(bias, K).double()
    plain = (rows - rows.mean(0)).T @ (onehot - onehot.mean(0)) / len(rows)
    assert float(_cosines(plain, label_dirs).max()) > 0.5


def test_mean_ablating_the_span_leaves_no_balanced_cross_covariance() -> None:
    rows, label, bias = _planted(seed=1)
    fitter = BiasSpanFitter(D, K, K)
    fitter.update(rows, label, bias)
    span = fitter.span()
    erased = rows - (rows - rows.mean(0)) @ span @ span.T
    after = BiasSpanFitter(D, K, K)
    after.update(erased, label, bias)
    before_norm = float(fitter.cross_covariance().norm())
    assert float(after.cross_covariance().norm()) < 1e-10 * max(before_norm, 1.0)


def test_position_rows_share_their_input_label_and_unknown_bias_is_skipped() -> None:
    rows, label, bias = _planted(n=600, seed=2)
    maps = rows[:, None, :].expand(-1, 4, -1)  # [N, P=4, D]: every position the same row
    bias = bias.clone()
    bias[:50] = -1
    per_position, per_input = BiasSpanFitter(D, K, K), BiasSpanFitter(D, K, K)
    per_position.update(maps, label, bias)
    per_input.update(rows, label, bias)
    assert torch.allclose(per_position.cross_covariance(), per_input.cross_covariance())
    assert float(per_position.counts.sum()) == 4 * 550


class _Reads(nn.Module):
    """A conv map whose channels carry (label, bias) coordinates; the head reads ``which`` of them."""

    def __init__(self, which: slice) -> None:
        super().__init__()
        self.stem = nn.Identity()
        self.head = nn.Linear(D, K, bias=False)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[:, which] = 4.0 * torch.eye(K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x).mean((2, 3)))


def _loader(rows: torch.Tensor, label: torch.Tensor, bias: torch.Tensor) -> list[dict[str, Any]]:
    images = rows.float()[:, :, None, None].expand(-1, -1, 2, 2).contiguous()  # [N, D, 2, 2]
    return [{"image": images[i : i + 256], "label": label[i : i + 256], "bias": bias[i : i + 256]}
            for i in range(0, len(rows), 256)]


def test_leace_span_through_a_model_and_what_its_ablation_costs() -> None:
    rows, label, bias = _planted(n=1200, seed=3)
    data = _loader(rows, label, bias)
    shortcut, honest = _Reads(slice(K, 2 * K)), _Reads(slice(0, K))
    span, space = bias_leace_span(shortcut, "stem", iter(data), num_classes=K, num_bias=K)  # one-shot is fine
    assert space == "position" and span.shape == (D, K - 1)
    flat, flat_space = bias_leace_span(shortcut, "stem", data, num_classes=K, num_bias=K, space="flatten")
    assert flat_space == "flatten" and flat.shape == (4 * D, K - 1)
    on_shortcut = concept_ablation(shortcut, "stem", span, data, space=space)
    on_honest = concept_ablation(honest, "stem", span, data, space=space)
    assert on_shortcut.concept["all"].kl > 0.5 > 100 * on_honest.concept["all"].kl
    assert on_shortcut.concept["all"].kl > 5 * on_shortcut.control["all"].kl  # rank 2 of 12: a random span costs some


def test_bias_span_errors_name_the_fix() -> None:
    rows, label, _ = _planted(n=300, seed=4)
    fitter = BiasSpanFitter(D, K, K)
    fitter.update(rows, label, label)  # bias == label: no class holds another bias value
    with pytest.raises(CdistillError, match="No class has inputs with every bias value"):
        fitter.span()
    with pytest.raises(CdistillError, match="outside"):
        fitter.update(rows, label, label + K)
    with pytest.raises(CdistillError, match=">= 2 bias values"):
        BiasSpanFitter(D, K, 1)
    data = [{"image": rows.float()[:, :, None, None], "label": label}]
    with pytest.raises(CdistillError, match="without 'bias'"):
        bias_leace_span(_Reads(slice(0, K)), "stem", data, num_classes=K, num_bias=K)
    with pytest.raises(CdistillError, match="stm"):
        bias_leace_span(_Reads(slice(0, K)), "stm", data, num_classes=K, num_bias=K)


def test_reliance_measure_with_the_leace_subspace(make_cfg: Any, tmp_path: Path) -> None:
    from cdistill.cli.measure import run_measure
    from cdistill.models.students import create_student

    path = tmp_path / "trained" / "student.pt"
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(create_student("mnist_cnn").state_dict(), path)
    args = ["experiment=color_mnist/cd", f"measure.ckpt={path}", "measure.measures=[reliance]",
            "measure.reliance.layer=pool1", "measure.reliance.max_inputs=64", "measure.reliance.k=0"]
    cavs = run_measure(make_cfg(*args))
    leace = run_measure(make_cfg(*args, "measure.reliance.subspace=leace", "measure.reliance.fit_split=[val_random]"))
    assert cavs["reliance/rank"] == 10
    assert 1 <= leace["reliance/rank"] <= 9  # 10 cue values: at most 9 contrasts
    assert leace["reliance/ablation_kl"] != cavs["reliance/ablation_kl"]
    assert leace["reliance/concept_agreement"] == cavs["reliance/concept_agreement"]  # not a subspace measure
    with pytest.raises(CdistillError, match=r"measure\.reliance\.subspace"):
        run_measure(make_cfg(*args, "measure.reliance.subspace=lease"))
