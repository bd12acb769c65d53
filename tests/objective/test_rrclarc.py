"""RR-ClArC (docs/methods.md §2.11): the squared output gradient along the signal CAV."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_distill

from cdistill.errors import CdistillError, NonFiniteError
from cdistill.objective.config import RRClArCConfig
from cdistill.objective.rrclarc import output_gradient, rr_classes, rrclarc_loss
from cdistill.tasks.distill import ConceptDistillModule
from datamodules import ColorMNISTDataModule

TERMS = [{"concept": "color_{y}", "negative": "grey"}]


def _tiny(acts: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """A nonlinear head: ``z_k = Σ_j m_kj a_j²``, so ``∇_a z_k = 2 a ⊙ m_k``."""
    return (acts**2) @ m.T


def test_loss_equals_the_hand_computation() -> None:
    torch.manual_seed(0)
    acts = torch.randn(5, 3, requires_grad=True)
    m = torch.randn(4, 3, requires_grad=True)
    classes = torch.tensor([0, 3, 1, 1, 2])
    cavs = torch.randn(4, 3) * 3.0  # not unit: the loss normalises them
    index = torch.tensor([[0, 1, 2, 3]])  # class k -> CAV row k
    loss, per_term = rrclarc_loss(output_gradient(acts, _tiny(acts, m), classes), classes, cavs, index, torch.ones(1))
    h = F.normalize(cavs, dim=1)
    a, w = acts.detach(), m.detach()
    expected = sum(float((2 * a[b] * w[k]) @ h[k]) ** 2 for b, k in enumerate(classes.tolist())) / 5
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert per_term.tolist() == pytest.approx([expected], rel=1e-5)
    loss.backward()  # differentiable through the gradient: the head's weights get a gradient
    assert m.grad is not None and m.grad.abs().sum() > 0


def test_loss_is_zero_when_the_gradient_is_orthogonal_to_the_signal() -> None:
    acts = torch.randn(6, 3, requires_grad=True)
    h = torch.tensor([[0.0, 0.0, 2.0]])
    m = torch.tensor([[1.0, -2.0, 0.0], [0.5, 3.0, 0.0]])  # no logit reads the signal's direction
    classes = torch.tensor([0, 1, 0, 1, 1, 0])
    index = torch.zeros(1, 2, dtype=torch.long)
    loss, _ = rrclarc_loss(output_gradient(acts, _tiny(acts, m), classes), classes, h, index, torch.ones(1))
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    m[0, 2] = 0.1  # one logit reads it a little: the loss is no longer 0
    loss, _ = rrclarc_loss(output_gradient(acts, _tiny(acts, m), classes), classes, h, index, torch.ones(1))
    assert loss.item() > 1e-4


def test_position_mode_sums_the_derivative_over_positions_and_skips_untrusted_classes() -> None:
    grads = torch.zeros(3, 2, 2)  # [B, P, C]
    grads[0] = torch.tensor([[1.0, 0.0], [2.0, 5.0]])
    grads[1] = torch.tensor([[0.0, 1.0], [0.0, -1.0]])  # cancels along channel 1
    grads[2] = torch.tensor([[9.0, 9.0], [9.0, 9.0]])
    cavs = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    classes = torch.tensor([0, 1, 2])
    index = torch.tensor([[0, 1, -1], [1, 1, 1]])  # term 0 has no CAV for class 2
    loss, per_term = rrclarc_loss(grads, classes, cavs, index, torch.tensor([1.0, 0.0]))
    assert per_term[0].item() == pytest.approx((3.0**2 + 0.0) / 2)  # sample 2 left out of term 0's mean
    assert per_term[1].item() == pytest.approx((5.0**2 + 0.0 + 18.0**2) / 3)
    assert loss.item() == pytest.approx(per_term[0].item())  # term 1 has weight 0


def test_faults_are_named() -> None:
    with pytest.raises(NonFiniteError, match="RR-ClArC"):
        rrclarc_loss(torch.full((2, 3), float("nan")), torch.zeros(2, dtype=torch.long), torch.ones(1, 3),
                     torch.zeros(1, 1, dtype=torch.long), torch.ones(1))
    with pytest.raises(CdistillError, match="another layer"):
        rrclarc_loss(torch.ones(2, 4), torch.zeros(2, dtype=torch.long), torch.ones(1, 3),
                     torch.zeros(1, 1, dtype=torch.long), torch.ones(1))
    with pytest.raises(CdistillError, match=r"model\.rrclarc\.target"):
        RRClArCConfig(target="logprob")


def test_classes_drawn_from_the_given_generator_only() -> None:
    labels = torch.arange(10)
    assert torch.equal(rr_classes(labels, 10, "logit"), labels)
    before = torch.get_rng_state()
    a = rr_classes(labels, 10, "random", torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(a, rr_classes(labels, 10, "random", torch.Generator().manual_seed(3)))
    assert not torch.equal(a, labels)


# --------------------------------------------------------------------------- in the distill task
@pytest.fixture(scope="module")
def dm(small_color_mnist: ColorMNISTDataModule) -> ColorMNISTDataModule:
    return small_color_mnist


def make(**kw: Any) -> ConceptDistillModule:
    module: ConceptDistillModule = tiny_distill(**({
        "layer": "pool1", "concepts": {"spec": "concepts/color_mnist.yaml", "terms": TERMS, "min_accuracy": 0.0},
    } | kw))
    return module


def _batch(dm: ColorMNISTDataModule, n: int = 16) -> dict[str, torch.Tensor]:
    items = [dm.split("train")[i] for i in range(n)]
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def test_signal_cavs_are_mean_differences_and_the_term_trains_the_student(dm: ColorMNISTDataModule) -> None:
    torch.manual_seed(0)
    module = make(lambda_rr=2.0)
    module.fit_artefacts(dm)
    assert module.signal_cavs is not None and len(module.cavs) == 0  # λ_c = 0: no filter CAVs
    assert set(module.signal_cavs.solvers) == {"mean_diff"} and "cav/acc_signal" in module.artefact_metrics
    # The CAV of colour 3 points along the difference of the mean activations (fitted on 70% of the sets).
    acts = module.concept_maps(dm)[1]
    diff = acts["color_3"].flatten(1).mean(0) - acts["grey"].flatten(1).mean(0)
    row = int(module.signal_cav_index[0, 3])
    assert F.cosine_similarity(module.signal_cavs.vectors[row], diff, dim=0) > 0.98
    out = module.compute_losses(_batch(dm))
    assert {"task", "rrclarc", "rrclarc/color_y", "loss"} <= out.keys() and "concept" not in out
    assert out["loss"].item() == pytest.approx((out["task"] + 2.0 * out["rrclarc"]).item(), rel=1e-5)
    g_after, g_before = torch.autograd.grad(out["rrclarc"], [module.student.conv2.weight, module.student.conv1.weight])
    assert g_after.abs().sum() > 0
    # A logit of a ReLU network is piecewise linear in the activation: its gradient there is
    # locally constant, so the term trains only the layers after the concept layer.
    assert g_before.abs().sum() == 0


def test_signal_cavs_only_in_the_state_dict_when_on(dm: ColorMNISTDataModule) -> None:
    off = make()
    assert not [k for k in off.state_dict() if k.startswith("signal_")]
    on = make(lambda_rr=1.0)
    on.fit_artefacts(dm)
    state = on.state_dict()
    assert {"signal_cav_index", "signal_cavs.vectors"} <= state.keys()
    fresh = make(lambda_rr=1.0)
    fresh.load_state_dict(state)  # an unfitted module receives the fitted bank (resizable buffers)
    assert fresh.signal_cavs is not None and torch.equal(fresh.signal_cavs.vectors, on.signal_cavs.vectors)
    assert fresh.signal_cavs.solvers == on.signal_cavs.solvers


def test_sensitize_only_terms_are_refused() -> None:
    with pytest.raises(CdistillError, match="only desensitizes"):
        make(lambda_rr=1.0, concepts={"spec": "concepts/color_mnist.yaml",
                                      "terms": [{"concept": "color_{y}", "negative": "grey", "direction": "sensitize"}]})
