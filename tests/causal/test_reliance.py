"""Interventional reliance measures (cdistill.causal.reliance) and the ``reliance`` measure of
``cdistill-measure``: planted models whose use of a direction is known."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from cdistill.causal import (
    causal_alignment,
    concept_ablation,
    concept_only_agreement,
    wilson_interval,
)
from cdistill.causal.ablation import Ablation
from cdistill.errors import CdistillError

MakeCfg = Callable[..., DictConfig]


class Reader(nn.Module):
    """Two-class logits ``±scale · (h · w)`` of the identity layer ``feat``'s output ``h``."""

    def __init__(self, w: Tensor, scale: float = 4.0) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.register_buffer("w", w / w.norm())
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        s = self.scale * (self.feat(x) @ self.w)
        return torch.stack([-s, s], -1)


def _planted(d: int, n: int = 400, seed: int = 0) -> tuple[Tensor, Tensor, list[dict[str, Tensor]]]:
    """Orthonormal ``u``, ``w`` and batches whose label is written along both ``u`` and ``w``
    (bias: the label on the first half, the other class on the second)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=gen))
    u, w = q[:, 0], q[:, 1]
    label = torch.randint(0, 2, (n,), generator=gen)
    sign = (2 * label - 1).float()[:, None]
    x = 0.3 * torch.randn(n, d, generator=gen) + 2.0 * sign * (u + w)
    bias = torch.where(torch.arange(n) < n // 2, label, 1 - label)
    batches = [{"image": x[i : i + 100], "label": label[i : i + 100], "bias": bias[i : i + 100]} for i in range(0, n, 100)]
    return u, w, batches


def test_ablating_the_read_direction_costs_kl_and_accuracy_and_beats_a_random_control() -> None:
    u, _, batches = _planted(256)
    res = concept_ablation(Reader(u), "feat", u[:, None], batches, control_seed=3)
    all_, rnd = res.concept["all"], res.control["all"]
    assert res.rank == 1 and res.space == "flatten" and set(res.concept) == {"all", "aligned", "conflicting"}
    assert all_.acc_before > 0.95 and all_.acc_drop > 0.3  # the read direction carried the label
    assert all_.kl > 0.6  # q is ~uniform after the ablation, p confident: KL near log 2
    assert rnd.kl < 0.02 * all_.kl and abs(rnd.acc_drop) < 0.05
    assert res.concept["aligned"].n == res.concept["conflicting"].n == 200
    assert res.concept["conflicting"].acc_drop > 0.3


def test_ablating_a_direction_the_model_cannot_see_changes_nothing() -> None:
    u, w, batches = _planted(16)
    res = concept_ablation(Reader(w), "feat", torch.stack([u, 2 * u], 1), batches)  # rank-1 span, given twice
    assert res.rank == 1
    assert res.concept["all"].kl < 1e-6 and res.concept["all"].acc_drop == 0.0
    assert res.concept["all"].acc_before > 0.95


def test_subspace_ablation_matches_the_one_direction_ablation_on_a_map() -> None:
    act = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    v = torch.nn.functional.normalize(torch.randn(5, dtype=torch.float64), dim=0)
    mean = torch.randn(5, dtype=torch.float64)
    one = Ablation("mean", "position", direction=v, mean=mean).apply(act)
    span = Ablation("mean", "position", direction=v[:, None], mean=mean).apply(act)
    assert torch.allclose(one, span)
    # what is left of the span is the mean's component: h·v == mean·v everywhere
    assert torch.allclose(span.movedim(1, -1) @ v, (mean @ v).expand(3, 4, 4))


def test_concept_ablation_errors_name_the_fix() -> None:
    u, _, batches = _planted(16)
    with pytest.raises(CdistillError, match="rows of size 16"):
        concept_ablation(Reader(u), "feat", torch.randn(8, 2), batches)
    with pytest.raises(CdistillError, match="spans all 16"):
        concept_ablation(Reader(u), "feat", torch.eye(16), batches)
    with pytest.raises(CdistillError, match="one-shot iterator"):
        concept_ablation(Reader(u), "feat", u[:, None], iter(batches))


class ByMean(nn.Module):
    """Predicts the class nearest to the image's mean value (value ``k`` images are filled with ``k``)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.register_buffer("centres", torch.arange(num_classes, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return -(x.flatten(1).mean(1, keepdim=True) - self.centres).abs()


class Constant(nn.Module):
    def __init__(self, k: int, num_classes: int) -> None:
        super().__init__()
        self.k, self.num_classes = k, num_classes

    def forward(self, x: Tensor) -> Tensor:
        return torch.nn.functional.one_hot(torch.full((len(x),), self.k), self.num_classes).float()


def test_concept_only_agreement_of_a_shortcut_and_a_constant_model() -> None:
    images = [torch.full((20, 1, 4, 4), float(k)) for k in range(5)]
    full = concept_only_agreement(ByMean(5), images, list(range(5)))
    assert (full.rate, full.n, full.successes, full.chance) == (1.0, 100, 100, pytest.approx(0.2))
    assert full.hi == pytest.approx(1.0) and full.chance < full.lo < 1.0
    flat = concept_only_agreement(Constant(2, 5), images, list(range(5)))
    assert flat.rate == pytest.approx(1 / 5) and flat.lo < 0.2 < flat.hi
    shifted = concept_only_agreement(ByMean(5), images, [1, 2, 3, 4, 0])  # values point to other classes
    assert shifted.rate == 0.0 and shifted.lo == 0.0
    with pytest.raises(CdistillError, match="one class per value"):
        concept_only_agreement(ByMean(5), images, [0, 1])


def test_wilson_interval_against_a_hand_computed_value() -> None:
    # 7 of 10, z = 1.96: centre (0.7 + 0.19207) / 1.38415 = 0.64449, half 1.41600 * sqrt(0.021 + 0.0096037)
    lo, hi = wilson_interval(7, 10)
    assert lo == pytest.approx(0.39677, abs=2e-4) and hi == pytest.approx(0.89222, abs=2e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(10, 10)[0] == pytest.approx(1 / (1 + 1.959963984540054**2 / 10))
    with pytest.raises(CdistillError, match="need n >= 1"):
        wilson_interval(3, 0)


def test_causal_alignment_equal_orthogonal_and_half() -> None:
    q, _ = torch.linalg.qr(torch.randn(12, 6, generator=torch.Generator().manual_seed(0)))
    sub = q[:, :2]
    same = causal_alignment(sub, 3 * sub, torch.tensor([2.0, 1.0]))
    assert torch.allclose(same.cosines, torch.ones(2, dtype=torch.float64)) and same.share == pytest.approx(1.0)
    orth = causal_alignment(q[:, 2:5], sub, torch.tensor([3.0, 2.0, 1.0]))
    assert float(orth.cosines.max()) < 1e-6 and orth.share == pytest.approx(0.0, abs=1e-12)
    # one direction at 45 degrees to the span (share 1/2) and one inside it, energies 3 : 1
    tilted = torch.stack([(q[:, 0] + q[:, 2]) / math.sqrt(2), q[:, 1]], 1)
    mixed = causal_alignment(tilted, sub, torch.tensor([3.0, 1.0]))
    assert mixed.share == pytest.approx((3 * 0.5 + 1 * 1.0) / 4)
    assert torch.allclose(mixed.shares, torch.tensor([0.5, 1.0], dtype=torch.float64))
    assert torch.allclose(mixed.cosines, torch.tensor([1.0, 1 / math.sqrt(2)], dtype=torch.float64))


def test_reliance_measure_through_cdistill_measure(make_cfg: MakeCfg, tmp_path: Path) -> None:
    from cdistill.cli.measure import run_measure
    from cdistill.models.students import create_student

    path = tmp_path / "trained" / "student.pt"
    path.parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(create_student("mnist_cnn").state_dict(), path)
    cfg = make_cfg("experiment=color_mnist/cd", f"measure.ckpt={path}", "measure.measures=[reliance]",
                   "measure.reliance.layer=conv1", "measure.reliance.max_inputs=64",
                   "measure.reliance.causal_inputs=32", "measure.reliance.max_iter=2")
    metrics = run_measure(cfg)
    keys = {"ablation_kl", "ablation_kl_random", "acc_drop", "acc_drop_conflicting", "acc_drop_aligned",
            "concept_agreement", "concept_agreement_lo", "concept_agreement_hi", "chance", "causal_share_in_bias", "rank"}
    assert {f"reliance/{k}" for k in keys} <= set(metrics)
    assert metrics["reliance/rank"] == 10 and metrics["reliance/chance"] == pytest.approx(0.1)
    assert metrics["reliance/ablation_kl"] >= 0 and metrics["reliance/ablation_kl_random"] >= 0
    assert metrics["reliance/concept_agreement_lo"] <= metrics["reliance/concept_agreement"] <= metrics["reliance/concept_agreement_hi"]
    assert 0.0 <= metrics["reliance/causal_share_in_bias"] <= 1.0
    assert "reliance/ablation_kl" in (Path(cfg.paths.output_dir) / "measure.md").read_text()
    out = Path(cfg.paths.output_dir)
    detail = json.loads((out / "reliance.json").read_text())  # what the plots drew
    assert [a["successes"] for a in detail["agreement"]] and len(detail["agreement"]) == 10
    pooled = sum(a["successes"] for a in detail["agreement"]) / sum(a["n"] for a in detail["agreement"])
    assert pooled == pytest.approx(metrics["reliance/concept_agreement"])
    assert len(detail["energies"]) == len(detail["shares"]) == 12  # k = rank + 2
    assert (out / "reliance_spectrum.png").is_file() and (out / "reliance_agreement.png").is_file()


def test_bias_term_is_the_class_indexed_term() -> None:
    from cdistill.cli.reliance_report import bias_term
    from cdistill.objective.config import ConceptsConfig

    terms = [{"concept": "stripes", "negative": "random"}, {"concept": "color_{y}", "negative": "grey"}]
    assert bias_term(ConceptsConfig.from_dict({"spec": "x.yaml", "terms": terms})).concept == "color_{y}"
    with pytest.raises(CdistillError, match="class-indexed bias term"):
        bias_term(ConceptsConfig.from_dict({"spec": "x.yaml", "terms": terms[:1]}))
