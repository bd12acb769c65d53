"""The concept-loss forms agree with their definitions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cdistill.losses import (
    concept_loss,
    corner_mask,
    local_loss,
    logprob_gradient,
    prototype_gradient,
)
from cdistill.prototypes import Prototypes


def test_prototype_form_equals_autograd_of_prototype_loss() -> None:
    torch.manual_seed(0)
    b, k, d, c = 16, 3, 40, 4
    protos = Prototypes(torch.randn(c, k, d, dtype=torch.float64))
    acts = torch.randn(b, d, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, c, (b,))
    cavs = F.normalize(torch.randn(2, d, dtype=torch.float64), dim=1)
    (grad,) = torch.autograd.grad(protos.loss(acts, labels).sum(), acts)
    expected = F.cosine_similarity(grad, cavs[0].expand(b, d), dim=1).abs().mean()
    index = torch.zeros(1, c, dtype=torch.long)  # one term, CAV row 0 for every class
    got, _ = concept_loss(
        prototype_gradient(acts, protos.mean_center(labels)), labels, cavs, index,
        torch.tensor([False]), torch.tensor([1.0], dtype=torch.float64),
    )
    assert torch.allclose(got, expected, atol=1e-6, rtol=0)
    # sensitize: 1 - cos
    got_s, _ = concept_loss(
        prototype_gradient(acts, protos.mean_center(labels)), labels, cavs, index,
        torch.tensor([True]), torch.tensor([1.0], dtype=torch.float64),
    )
    expected_s = (1 - F.cosine_similarity(grad, cavs[0].expand(b, d), dim=1)).mean()
    assert torch.allclose(got_s, expected_s, atol=1e-6, rtol=0)


def test_class_scope_and_per_class_cavs() -> None:
    d = 5
    cavs = torch.eye(d)[:3]
    grads = torch.tensor([[1.0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0], [1.0, 1.0, 0, 0, 0]])
    labels = torch.tensor([0, 1, 2])
    # class y uses CAV row y; class 2 out of scope.
    index = torch.tensor([[0, 1, -1]])
    loss, per = concept_loss(grads, labels, cavs, index, torch.tensor([False]), torch.tensor([2.0]))
    assert torch.allclose(per, torch.tensor([1.0]))  # |cos| = 1 for both in-scope samples
    assert torch.allclose(loss, torch.tensor(2.0))
    index = torch.tensor([[1, 0, -1]])  # swapped: orthogonal -> 0
    _, per = concept_loss(grads, labels, cavs, index, torch.tensor([False]), torch.tensor([1.0]))
    assert torch.allclose(per, torch.tensor([0.0]))


def _tiny() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    body = nn.Sequential(nn.Linear(4, 6), nn.Tanh()).double()
    return body, head


def test_logit_form_gradients_match_finite_differences() -> None:
    body, head = _tiny()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1])
    cavs = F.normalize(torch.randn(2, 6, dtype=torch.float64), dim=1)
    index = torch.tensor([[0, 1, 0]])

    def objective(*params: torch.Tensor) -> torch.Tensor:
        w1, b1 = params
        a = torch.tanh(x @ w1.T + b1)
        logits = head(a)
        g = logprob_gradient(a, logits, y)
        loss, _ = concept_loss(g, y, cavs, index, torch.tensor([False]), torch.ones(1, dtype=torch.float64))
        return loss

    w1 = body[0].weight.detach().clone().requires_grad_(True)
    b1 = body[0].bias.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(objective, (w1, b1), eps=1e-6, atol=1e-5)


def test_logprob_gradient_is_per_sample() -> None:
    body, head = _tiny()
    x = torch.randn(4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1])
    a = body(x)
    g = logprob_gradient(a, head(a), y)
    for i in range(4):
        ai = body(x[i : i + 1])
        (gi,) = torch.autograd.grad(F.log_softmax(head(ai), 1)[0, y[i]], ai)
        assert torch.allclose(g[i], gi[0], atol=1e-12)


def test_local_loss_matches_manual_and_respects_mask() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2])
    mask = corner_mask((3, 1, 6, 6), size=2)
    got = local_loss(x, model(x), y, mask)
    (g,) = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)
    assert torch.allclose(got, (g * mask).pow(2).sum() / 3)
    zero = local_loss(x, model(x), y, torch.zeros_like(mask))
    assert zero.item() == 0.0
    assert int(mask.sum().item()) == 3 * 4 * 4
