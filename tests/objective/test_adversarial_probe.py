"""The adversarial concept probe (docs/methods.md §2.12): the game, its sizing, its place in the
task's optimizer and checkpoints."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import tiny_distill
from torch import nn

from cdistill.errors import CdistillError
from cdistill.objective.adversarial_probe import (
    ConceptProbe,
    fit_probe,
    layer_features,
    probe_step,
    probed_sets,
)
from cdistill.objective.concept_images import ConceptImageSet
from cdistill.objective.config import ConceptTerm, ProbeConfig
from cdistill.tasks.distill import ConceptDistillModule
from cdistill.tasks.probing import probe_values
from datamodules import ColorMNISTDataModule

TERMS = [{"concept": "color_{y}", "negative": "grey"}]


class _Student(nn.Module):
    """A 1x1 conv ``feat`` over a 'shape' channel 0 and a 'cue' channel 1, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Conv2d(2, 4, kernel_size=1)
        self.head = nn.Linear(4 * 3 * 3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feat(x).flatten(1))


def _cue_sets(n: int = 30, seed: int = 0) -> list[ConceptImageSet]:
    """Three cue values: channel 1 at level -1, 0 or 1 (plus noise); channel 0 is noise."""
    gen = torch.Generator().manual_seed(seed)
    values = []
    for level in (-1.0, 0.0, 1.0):
        x = torch.randn(n, 2, 3, 3, generator=gen) * 0.1
        x[:, 1] += level
        x[:, 0] += torch.randn(n, 1, 1, generator=gen)
        values.append(x)
    return [ConceptImageSet(values, [0, 1, 2], torch.zeros(4, 2, 3, 3), sensitize=False, weight=1.0)]


def _features(model: _Student, sets: list[ConceptImageSet]) -> list[list[torch.Tensor]]:
    with torch.no_grad():
        return [[layer_features(model, model, "feat", v) for v in s.values] for s in sets]


def _fresh_probe_accuracy(model: _Student, sets: list[ConceptImageSet]) -> float:
    """What the best linear probe fitted from scratch still reads (not the game's own probe)."""
    probe = ConceptProbe([3])
    probe.resize(36)
    return fit_probe(probe, _features(model, sets), steps=300, lr=0.05)


def test_training_against_the_probe_fools_it_but_a_fresh_probe_still_reads_the_cue() -> None:
    """The game works as a game: the probe's accuracy falls from 1.0 and the student's term with
    it. And its known limit (docs/methods.md §2.12): the student moves the cue out of the current
    probe's reach instead of removing it, so a probe fitted afresh still reads it."""
    torch.manual_seed(0)
    student, sets = _Student(), _cue_sets()
    probe = ConceptProbe([3])
    probe.resize(36)
    assert fit_probe(probe, _features(student, sets), steps=200, lr=0.05, smoothing=0.1) == 1.0
    opt = torch.optim.Adam([*student.parameters(), *probe.parameters()], lr=0.02)
    gen = torch.Generator().manual_seed(1)
    steps = []
    for _ in range(400):
        step = probe_step(probe, sets, lambda x: layer_features(student, student, "feat", x), 16, gen, 0.1)
        steps.append(step)
        opt.zero_grad()
        (step.confusion + step.fit).backward()
        opt.step()
    assert steps[0].accuracy.item() == 1.0
    late = steps[-100:]
    assert sum(s.accuracy.item() for s in late) / len(late) < 0.8
    assert sum(s.confusion.item() for s in late) / len(late) < 0.2 * steps[0].confusion.item()
    assert _fresh_probe_accuracy(student, _cue_sets(seed=5)) == 1.0


def test_each_part_trains_only_its_own_side() -> None:
    torch.manual_seed(0)
    student, sets = _Student(), _cue_sets()
    probe = ConceptProbe([3])
    probe.resize(36)
    fit_probe(probe, _features(student, sets), steps=50, lr=0.05)
    step = probe_step(probe, sets, lambda x: layer_features(student, student, "feat", x), 4, None)
    own = [probe.weight, probe.bias]
    theirs = list(student.feat.parameters())
    g_fit = torch.autograd.grad(step.fit, own + theirs, retain_graph=True, allow_unused=True)
    g_conf = torch.autograd.grad(step.confusion, own + theirs, allow_unused=True)
    assert all(g is not None and g.abs().sum() > 0 for g in g_fit[:2])
    assert all(g is None for g in g_fit[2:])  # the probe's loss never reaches the student
    assert all(g is None for g in g_conf[:2])  # the student's term never moves the probe
    assert all(g is not None and g.abs().sum() > 0 for g in g_conf[2:])


def test_probe_sizing_and_loading_into_an_unsized_probe() -> None:
    probe = ConceptProbe([3, 2])
    with pytest.raises(CdistillError, match="prepare_probe"):
        probe.blocks(torch.zeros(1, 5))
    probe.resize(5)
    with torch.no_grad():
        probe.weight.normal_()
    blocks = probe.blocks(torch.ones(2, 5))
    assert [b.shape for b in blocks] == [(2, 3), (2, 2)]
    fresh = ConceptProbe([3, 2])
    fresh.load_state_dict(probe.state_dict())
    assert torch.equal(fresh.weight, probe.weight)
    with pytest.raises(CdistillError, match=r"\{y\}"):
        ConceptProbe([])


def test_probe_values_follow_the_probed_sets() -> None:
    terms = (ConceptTerm("color_{y}"), ConceptTerm("color_{y}", classes=(3,)), ConceptTerm("stripes"),
             ConceptTerm("shape_{y}", direction="sensitize"), ConceptTerm("glyph_{y}", classes=(1, 2)))
    assert probe_values(terms, 10) == [10, 2]
    sets = [ConceptImageSet([torch.zeros(1)] * v, list(range(v)), torch.zeros(1), sensitize=s, weight=1.0)
            for v, s in ((10, False), (1, False), (1, False), (10, True), (2, False))]
    assert [len(s.values) for s in probed_sets(sets)] == [10, 2]
    with pytest.raises(CdistillError, match="smoothing"):
        ProbeConfig(smoothing=1.0)
    with pytest.raises(CdistillError, match="per_set"):
        ProbeConfig(per_set=0)


# --------------------------------------------------------------------------- in the distill task
@pytest.fixture(scope="module")
def dm(small_color_mnist: ColorMNISTDataModule) -> ColorMNISTDataModule:
    return small_color_mnist


def make(**kw: Any) -> ConceptDistillModule:
    module: ConceptDistillModule = tiny_distill(**({
        "layer": "pool1", "probe": {"per_set": 2, "warm_steps": 20},
        "concepts": {"spec": "concepts/color_mnist.yaml", "terms": TERMS, "min_accuracy": 0.0},
    } | kw))
    return module


def test_probe_is_outside_the_student_and_in_the_optimizer(dm: ColorMNISTDataModule) -> None:
    torch.manual_seed(0)
    plain, module = make(), make(lambda_adv=1.0)
    assert plain.probe is None and not [k for k in plain.state_dict() if k.startswith("probe.")]
    assert list(module.student.state_dict()) == list(plain.student.state_dict())  # student.pt keys
    module.prepare_probe(dm)
    assert tuple(module.probe.weight.shape) == (10, 20 * 12 * 12)  # pool1 of the MNIST CNN, 10 colours
    opt = module.configure_optimizers()
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    assert id(module.probe.weight) in ids and len(opt.param_groups) == 1
    fast = make(lambda_adv=1.0, probe={"lr": 0.05})
    fast.prepare_probe(dm)
    groups = fast.configure_optimizers().param_groups
    assert [g["lr"] for g in groups] == [1e-3, 0.05] and groups[1]["params"][0] is fast.probe.weight
    assert sum(len(g["params"]) for g in groups) == len(list(fast.parameters()))


def test_probe_terms_in_compute_losses_and_checkpoint_round_trip(dm: ColorMNISTDataModule) -> None:
    torch.manual_seed(0)
    module = make(lambda_adv=0.5)
    module.fit_artefacts(dm)
    with pytest.raises(CdistillError, match="load_concept_images"):
        module.compute_losses(next(iter(dm.train_dataloader())))
    module.load_concept_images(dm)
    module.prepare_probe(dm)
    module.warm_probe()
    assert module.artefact_metrics["probe/acc_start"] > 0.9  # the biased base colours are readable at pool1
    out = module.compute_losses(next(iter(dm.train_dataloader())))
    assert {"probe", "probe_fit", "probe_acc", "task", "loss"} <= out.keys() and "output" not in out
    expected = out["task"] + 0.5 * out["probe"] + out["probe_fit"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    out["loss"].backward()
    assert module.probe.weight.grad is not None and module.student.conv1.weight.grad is not None
    fresh = make(lambda_adv=0.5)  # unsized: takes the saved size and weights
    fresh.load_state_dict(module.state_dict())
    assert torch.equal(fresh.probe.weight, module.probe.weight) and torch.equal(fresh.probe.bias, module.probe.bias)
