"""The concept-image terms: concept-only predictions (§2.8) and latent counterfactuals (§2.9)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdistill.concepts import load_spec
from cdistill.errors import CdistillError
from cdistill.objective import counterfactual as cf
from cdistill.objective.concept_images import ConceptImageSet, ConceptImageTerms
from cdistill.objective.concept_outputs import output_divergence
from cdistill.objective.config import CounterfactualConfig, OutputConfig


def test_uniform_divergence_is_zero_only_at_uniform() -> None:
    assert output_divergence(torch.zeros(4, 10), "uniform").item() == pytest.approx(0.0, abs=1e-6)
    confident = torch.zeros(4, 10)
    confident[:, 3] = 8.0
    value = output_divergence(confident, "uniform").item()
    # KL(u || p) with p = softmax([8, 0, ...]): -log 10 - mean_j log p_j
    logp = F.log_softmax(confident[0], 0)
    assert value == pytest.approx(float(-math.log(10) - logp.mean()), rel=1e-5)


def test_negative_and_pooled_targets() -> None:
    concept = torch.randn(6, 5, requires_grad=True)
    negative = torch.randn(7, 5)
    q = F.softmax(negative, 1).mean(0)
    expected = (q * (q.log() - F.log_softmax(concept, 1))).sum(1).mean()
    got = output_divergence(concept, "negative", negative)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()
    assert concept.grad is not None and concept.grad.abs().sum() > 0
    same = torch.randn(1, 5).expand(6, 5)  # all predictions equal: nothing depends on the value
    assert output_divergence(same, "pooled").item() == pytest.approx(0.0, abs=1e-6)
    assert output_divergence(torch.randn(6, 5), "pooled").item() > 0
    with pytest.raises(ValueError, match="needs the negative"):
        output_divergence(concept, "negative")


def test_set_reduction_pulls_each_values_mean_not_each_image() -> None:
    # Value 0's images: half predicted class 0, half class 1 (e.g. faces of both ages), mean
    # uniform; value 1's images all predicted class 1 (the cue decides).
    mixed = torch.tensor([[6.0, 0.0], [0.0, 6.0]] * 2)
    leaning = torch.tensor([[0.0, 6.0]] * 4)
    assert output_divergence(mixed, "uniform", sets=1).item() == pytest.approx(0.0, abs=1e-6)
    assert output_divergence(mixed, "uniform").item() > 1.0  # per image: every image is confident
    both = torch.cat([mixed, leaning])
    p1 = F.softmax(leaning, 1).mean(0)
    expected = 0.5 * float(-math.log(2) - p1.log().mean())  # block 0 contributes 0
    assert output_divergence(both, "uniform", sets=2).item() == pytest.approx(expected, rel=1e-5)
    # pooled: each block's mean against the mean of the blocks
    assert output_divergence(torch.cat([mixed, mixed]), "pooled", sets=2).item() == pytest.approx(0.0, abs=1e-6)
    assert output_divergence(both, "pooled", sets=2).item() > 0.05
    with pytest.raises(CdistillError, match=r"model\.outputs\.reduce"):
        OutputConfig(reduce="batch")


def test_paired_load_draws_the_same_strokes_for_every_value_and_the_negative(tmp_path: Path) -> None:
    own = load_spec("concepts/color_mnist.yaml")
    (tmp_path / "faces").mkdir()
    (tmp_path / "spec.yaml").write_text("sets:\n  women: {folder: faces}\n")
    paired = load_spec("concepts/color_mnist.yaml", paired=True)
    def mismatch(sets: dict[str, torch.Tensor], a: str, b: str) -> float:
        """Share of inked pixels inked in one image of the pair only (faint edges round to 0
        in a dark colour, hence not exactly 0)."""
        ink_a, ink_b = sets[a][:150].amax(1) > 0, sets[b][:150].amax(1) > 0
        return float((ink_a != ink_b).sum() / ink_a.sum())

    assert mismatch(paired, "color_2", "color_7") < 0.002 and mismatch(paired, "color_2", "grey") < 0.002
    assert not torch.equal(paired["color_2"], paired["color_7"])  # ... in other colours
    assert mismatch(own, "color_2", "color_7") > 0.5  # without pairing each set has its own strokes
    with pytest.raises(CdistillError, match="paired"):
        load_spec(tmp_path / "spec.yaml", paired=True)
    # glyph sets over strokes pair with the plain strokes too
    marker = load_spec("concepts/marker_mnist.yaml", paired=True)
    strokes = marker["strokes"][:150].float()
    assert bool(((marker["glyph_4"].float() - strokes) >= 0).all())  # the glyph is added, strokes kept


def test_paired_target_compares_each_image_with_its_own_versions() -> None:
    gen = torch.Generator().manual_seed(0)
    per_pair = torch.randn(1, 6, 4, generator=gen)  # six pairs, each with its own prediction
    same = per_pair.expand(3, 6, 4)  # two values and the negative agree within each pair
    concept, negative = same[:2].reshape(12, 4), same[2]
    assert output_divergence(concept, "paired", negative).item() == pytest.approx(0.0, abs=1e-6)
    # the pooled target is not satisfied by that: the pairs' predictions differ from each other
    assert output_divergence(concept, "pooled").item() > 0.05
    moved = concept.clone()
    moved[6:] += torch.tensor([3.0, 0, 0, 0])  # value 1 leans to class 0 on the same shapes
    assert output_divergence(moved, "paired", negative).item() > 0.1
    # reduce=set does not apply: each pair is compared image by image
    assert output_divergence(moved, "paired", negative, sets=2) == output_divergence(moved, "paired", negative)


def test_moments_move_each_foreground_channel_to_the_other_values_mean_and_spread() -> None:
    gen = torch.Generator().manual_seed(0)
    blank = torch.zeros(1, 2, 6, 6)
    fg = torch.zeros(1, 1, 6, 6)
    fg[..., 1:5, 1:5] = 1.0
    # value 0: channel 0 ~ 1 + 0.5 z, value 1: channel 0 ~ 4 + 2 z; channel 1 constant 3 (no spread)
    def draw(mu: float, sd: float, n: int) -> torch.Tensor:
        a = torch.zeros(n, 2, 6, 6)
        a[:, 0] = mu + sd * torch.randn(n, 6, 6, generator=gen)
        a[:, 1] = 3.0
        return a * fg
    stats = cf.value_means([draw(1.0, 0.5, 400), draw(4.0, 2.0, 400)], blank, "moments")
    assert stats.shape == (2, 2, 2)
    assert stats[1, 0, 0].item() == pytest.approx(4.0, abs=0.05) and stats[1, 1, 0].item() == pytest.approx(2.0, abs=0.05)
    acts = draw(1.0, 0.5, 200)
    scale, delta = cf.affine(stats, torch.zeros(200, dtype=torch.long), torch.ones(200, dtype=torch.long), acts, blank)
    moved = scale * acts + delta
    inside = moved[:, 0][fg[0, 0].expand(200, 6, 6) > 0]
    assert inside.mean().item() == pytest.approx(4.0, abs=0.1) and inside.std().item() == pytest.approx(2.0, abs=0.1)
    assert torch.equal(moved[:, :, 0, 0], acts[:, :, 0, 0])  # background untouched
    # the constant channel has no spread: shifted only (3 -> 3), not rescaled by 0/0
    assert torch.allclose(moved[:, 1][fg[0, 0].expand(200, 6, 6) > 0], torch.tensor(3.0))
    with pytest.raises(ValueError, match="affine"):
        cf.shift(stats, torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long), "moments", acts[:1], blank)


def test_transport_maps_one_values_channel_distribution_onto_the_others() -> None:
    """The Gaussian optimal-transport map reproduces the other value's mean and covariance,
    including the channel correlations that ``moments`` (per channel) cannot."""
    gen = torch.Generator().manual_seed(0)
    blank = torch.zeros(1, 3, 5, 5)
    mix = [torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.3, 1.0]]),
           torch.tensor([[2.0, 0.0, 0.0], [-1.5, 0.5, 0.0], [0.4, 0.0, 0.7]])]
    centre = [torch.tensor([3.0, 2.0, 4.0]), torch.tensor([6.0, 5.0, 3.0])]

    def draw(k: int, n: int) -> torch.Tensor:
        z = torch.randn(n, 5, 5, 3, generator=gen)
        return (z @ mix[k].T + centre[k]).permute(0, 3, 1, 2)  # every position is foreground

    stats = cf.value_means([draw(0, 400), draw(1, 400)], blank, "transport")
    assert stats.shape == (2, 4, 3)
    matrices, offsets = cf.transport(stats, torch.zeros(300, dtype=torch.long), torch.ones(300, dtype=torch.long))
    acts = draw(0, 300)
    moved = torch.einsum("bcd,bdhw->bchw", matrices, acts) + offsets[:, :, None, None]
    rows = moved.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.allclose(rows.mean(0), centre[1], atol=0.1)
    target = mix[1] @ mix[1].T
    assert torch.allclose(torch.cov(rows.T), target, atol=0.15 * target.abs().max().item())
    # the identity pair maps to (almost) nothing: A = I, d = 0
    same, zero = cf.transport(stats, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert torch.allclose(same[0], torch.eye(3), atol=1e-4) and zero.abs().max() < 1e-3
    with pytest.raises(ValueError, match="transport"):
        cf.shift(stats, torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.long), "transport", acts[:1], blank)


def test_shift_layer_parse_and_errors() -> None:
    assert cf.ShiftLayer.parse("pool1") == cf.ShiftLayer("pool1", "flatten")
    assert cf.ShiftLayer.parse("input:position") == cf.ShiftLayer("input", "position")
    with pytest.raises(CdistillError, match="not one of"):
        cf.ShiftLayer.parse("pool1:sideways")
    with pytest.raises(CdistillError, match="sideways"):
        CounterfactualConfig.from_dict({"layers": ["input:sideways"]})
    assert [str(s) for s in CounterfactualConfig().layers_for("pool1")] == ["input:position", "pool1"]
    with pytest.raises(CdistillError, match=r"model\.outputs\.target"):
        OutputConfig(target="entropy")


def test_position_shift_lands_on_foreground_only() -> None:
    blank = torch.zeros(1, 3, 4, 4)
    acts = torch.zeros(2, 3, 4, 4)
    acts[0, :, 1, 1] = 1.0  # one foreground position in sample 0, two in sample 1
    acts[1, :, 2, 2:] = 1.0
    concept = [torch.zeros(3, 3, 4, 4), torch.zeros(3, 3, 4, 4)]
    concept[0][:, 0, 0, 0] = 2.0  # value 0: channel 0 where drawn
    concept[1][:, 1, 3, 3] = 4.0  # value 1: channel 1 where drawn
    means = cf.value_means(concept, blank, "position")
    assert torch.allclose(means, torch.tensor([[2.0, 0, 0], [0, 4.0, 0]]))
    delta = cf.shift(means, torch.tensor([0, 1]), torch.tensor([1, 0]), "position", acts, blank)
    assert torch.equal(delta[0, :, 1, 1], torch.tensor([-2.0, 4.0, 0]))
    assert delta[0].abs().sum() == 6.0  # nowhere else
    assert torch.equal(delta[1, :, 2, 2], torch.tensor([2.0, -4.0, 0])) and delta[1].abs().sum() == 12.0
    assert torch.equal(cf.foreground(acts, blank)[1, 0], acts[1, 0])
    flat = cf.shift(cf.value_means(concept, blank, "flatten"), torch.tensor([0]), torch.tensor([1]), "flatten")
    assert flat.shape == (1, 3, 4, 4)


def test_mapped_hook_is_removed_even_on_error() -> None:
    layer = nn.Identity()
    with pytest.raises(RuntimeError), cf.mapped(layer, lambda a: a + 1):
        assert layer(torch.zeros(1)).item() == 1.0
        raise RuntimeError("boom")
    assert layer(torch.zeros(1)).item() == 0.0 and not layer._forward_hooks


class _TwoChannel(nn.Module):
    """Logits from channel 0 (the 'shape') and, with ``reads_cue``, channel 1 (the cue)."""

    def __init__(self, reads_cue: bool) -> None:
        super().__init__()
        self.input = nn.Identity()
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[-3.0, -9.0 * reads_cue], [3.0, 9.0 * reads_cue]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.input(x).mean((2, 3)))


def _cue_sets() -> list[ConceptImageSet]:
    # Value k: channel 1 at level 2k - 1 (no 'shape' in channel 0); class k.
    values = [torch.zeros(5, 2, 3, 3), torch.zeros(5, 2, 3, 3)]
    values[0][:, 1], values[1][:, 1] = -1.0, 1.0
    return [ConceptImageSet(values, [0, 1], torch.zeros(5, 2, 3, 3), sensitize=False, weight=1.0)]


@pytest.mark.parametrize("mode", ["flatten", "position", "moments", "gain", "transport"])
def test_counterfactual_cost_falls_when_the_cue_is_not_read(mode: str) -> None:
    x = torch.zeros(4, 2, 3, 3)
    y = torch.tensor([0, 1, 0, 1])
    x[:, 0] = (2 * y - 1).view(-1, 1, 1).float()  # the shape says the class ...
    x[:, 1] = (2 * y - 1).view(-1, 1, 1).float()  # ... and so does the cue (100% correlated)
    out = {}
    for reads in (True, False):
        model = _TwoChannel(reads)
        terms = ConceptImageTerms(_cue_sets(), torch.zeros(1, 2, 3, 3), OutputConfig(per_set=5),
                                  [cf.ShiftLayer("input", mode)])
        res = terms(model, model, x, y, torch.Generator().manual_seed(0))
        out[reads] = res
        task = F.cross_entropy(model(x), y)
        if not reads:  # the counterfactual only moves the cue: nothing changes for this model
            assert res["counterfactual"].item() == pytest.approx(task.item(), rel=1e-5)
    assert out[True]["counterfactual"] > out[False]["counterfactual"] + 2.0  # the moved cue flips its answer
    # Concept-only predictions: the cue-reader tells the values apart, the other predicts uniformly.
    assert out[True]["output"] > 0.1 and out[False]["output"].item() == pytest.approx(0.0, abs=1e-6)
    out[True]["counterfactual"].backward()


def test_counterfactual_needs_a_term_with_values() -> None:
    one = [ConceptImageSet([torch.zeros(2, 1, 2, 2)], [0], torch.zeros(2, 1, 2, 2), sensitize=False, weight=1.0)]
    with pytest.raises(CdistillError, match=r"\{y\}"):
        ConceptImageTerms(one, torch.zeros(1, 1, 2, 2), OutputConfig(), [cf.ShiftLayer("input")])
