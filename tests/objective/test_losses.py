"""The concept-loss forms agree with their definitions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cdistill.objective.losses import (
    concept_loss,
    corner_mask,
    local_loss,
    logit_target,
    logprob_gradient,
    position_gradients,
    prototype_gradient,
    subspace_basis,
)
from cdistill.objective.prototypes import Prototypes


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


def test_position_form_planted_directions() -> None:
    """Per-position gradients orthogonal to the channel CAV cost 0, parallel ones 1, and a
    mix costs the norm-weighted fraction ``Σ_p |g_p·v| / Σ_p ||g_p||``."""
    c, p = 4, 3
    v = torch.eye(c)[:1]  # CAV along channel 0
    index = torch.zeros(1, 2, dtype=torch.long)
    labels = torch.tensor([0, 1])
    ortho = torch.zeros(2, p, c)
    ortho[..., 1] = torch.tensor([1.0, -2.0, 3.0])
    loss, _ = concept_loss(ortho, labels, v, index, torch.tensor([False]), torch.ones(1))
    assert loss.item() == 0.0
    par = torch.zeros(2, p, c)
    par[..., 0] = torch.tensor([1.0, -2.0, 3.0])  # signs differ per position: |.| counts all
    loss, _ = concept_loss(par, labels, v, index, torch.tensor([False]), torch.ones(1))
    assert torch.allclose(loss, torch.tensor(1.0))
    mix = torch.zeros(1, p, c)
    mix[0, 0] = torch.tensor([3.0, 4.0, 0, 0])  # |g.v| = 3, ||g|| = 5
    mix[0, 1] = torch.tensor([0.0, 0.0, 1.0, 0])  # 0, 1
    mix[0, 2] = torch.tensor([-1.0, 0.0, 0.0, 0])  # 1, 1
    got, _ = concept_loss(mix, labels[:1], v, index, torch.tensor([False]), torch.ones(1))
    assert torch.allclose(got, torch.tensor(4.0 / 7.0))
    uni, _ = concept_loss(mix, labels[:1], v, index, torch.tensor([False]), torch.ones(1), position_weight="uniform")
    assert torch.allclose(uni, torch.tensor((0.6 + 0.0 + 1.0) / 3))
    sens, _ = concept_loss(mix, labels[:1], v, index, torch.tensor([True]), torch.ones(1))
    assert torch.allclose(sens, torch.tensor(1 - (3.0 - 1.0) / 7.0))
    # one position is the flattened form: the plain cosine
    g = torch.randn(5, c)
    flat, _ = concept_loss(g, torch.zeros(5, dtype=torch.long), v, index, torch.tensor([False]), torch.ones(1))
    one, _ = concept_loss(g[:, None], torch.zeros(5, dtype=torch.long), v, index, torch.tensor([False]), torch.ones(1))
    assert torch.allclose(flat, one)
    assert torch.allclose(flat, F.cosine_similarity(g, v.expand(5, c), dim=1).abs().mean())


def test_position_gradients_layout() -> None:
    maps = torch.randn(2, 3, 4, 5)
    g = position_gradients(maps.reshape(2, -1), (3, 4, 5))
    assert g.shape == (2, 20, 3)
    assert torch.equal(g[1, 4 * 5 - 1], maps[1, :, 3, 4])
    assert torch.equal(g[0, 1 * 5 + 2], maps[0, :, 1, 2])


def test_position_prototype_form_equals_autograd() -> None:
    """``a - Pbar_y`` split per position gives the per-position cosines of the autograd
    gradient of the prototype loss (the positive scale drops out of every ratio)."""
    torch.manual_seed(0)
    b, k, c, h, w, ncls = 6, 2, 5, 3, 4, 3
    d = c * h * w
    protos = Prototypes(torch.randn(ncls, k, d, dtype=torch.float64))
    acts = torch.randn(b, c, h, w, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, ncls, (b,))
    cavs = F.normalize(torch.randn(3, c, dtype=torch.float64), dim=1)
    index = torch.tensor([[0, 1, 2]])
    (grad,) = torch.autograd.grad(protos.loss(acts, labels).sum(), acts)
    gp = grad.reshape(b, c, h * w).transpose(1, 2)  # [B, P, C]
    v = cavs[labels]  # [B, C]
    expected = ((gp * v[:, None]).sum(-1).abs().sum(-1) / gp.norm(dim=-1).sum(-1)).mean()
    got, _ = concept_loss(
        position_gradients(prototype_gradient(acts, protos.mean_center(labels)), (c, h, w)), labels, cavs, index,
        torch.tensor([False]), torch.ones(1, dtype=torch.float64),
    )
    assert torch.allclose(got, expected, atol=1e-10, rtol=0)


def test_subspace_term_is_the_fraction_in_the_span() -> None:
    torch.manual_seed(0)
    c = 6
    cavs = F.normalize(torch.randn(3, c, dtype=torch.float64), dim=1)
    index = torch.tensor([[0, 1, 2, 1]])  # the span of rows 0..2, every class
    basis = subspace_basis(cavs)
    assert basis.shape == (3, c)
    assert torch.allclose(basis @ basis.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    labels = torch.tensor([0, 3])
    inside = (torch.randn(2, 3, dtype=torch.float64) @ cavs)  # in the span: fraction 1
    sub = torch.tensor([True])
    loss, _ = concept_loss(inside, labels, cavs, index, torch.tensor([False]), torch.ones(1), subspace=sub)
    assert torch.allclose(loss, torch.tensor(1.0, dtype=torch.float64))
    g = torch.randn(2, c, dtype=torch.float64)
    outside = g - (g @ basis.T) @ basis  # orthogonal to the span: 0
    loss, _ = concept_loss(outside, labels, cavs, index, torch.tensor([False]), torch.ones(1), subspace=sub)
    assert loss.abs().item() < 1e-12
    loss, _ = concept_loss(g, labels, cavs, index, torch.tensor([False]), torch.ones(1), subspace=sub)
    expected = ((g @ basis.T).norm(dim=1) / g.norm(dim=1)).mean()
    assert torch.allclose(loss, expected)
    # a per-class term sees only its own CAV: smaller than the subspace fraction
    per, _ = concept_loss(g, labels, cavs, index, torch.tensor([False]), torch.ones(1))
    assert per < loss
    # a duplicated CAV adds no dimension
    assert subspace_basis(torch.cat([cavs, cavs[:1]])).shape == (3, c)
    # rank r: the top-r singular directions, and a rank-r term sees less than the whole span
    top2 = subspace_basis(cavs, 2)
    _, _, vh = torch.linalg.svd(cavs)
    assert torch.allclose((top2 @ vh[:2].T).abs().det().abs(), torch.tensor(1.0, dtype=torch.float64))
    r2, _ = concept_loss(g, labels, cavs, index, torch.tensor([False]), torch.ones(1), subspace=sub,
                         ranks=torch.tensor([2]))
    assert torch.allclose(r2, ((g @ top2.T).norm(dim=1) / g.norm(dim=1)).mean()) and r2 < loss
    # scale invariance, down to tiny (saturated-model) gradients
    tiny, _ = concept_loss(g * 1e-30, labels, cavs, index, torch.tensor([False]), torch.ones(1), subspace=sub)
    assert torch.allclose(tiny, loss)


def test_position_logit_form_is_differentiable() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 4, 3).double()
    head = nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    cavs = F.normalize(torch.randn(3, 4, dtype=torch.float64), dim=1)
    index = torch.tensor([[0, 1, 2]])

    def objective(weight: torch.Tensor) -> torch.Tensor:
        a = F.conv2d(x, weight, conv.bias)
        g = position_gradients(logprob_gradient(a, head(a), y), tuple(a.shape[1:]))
        return concept_loss(g, y, cavs, index, torch.tensor([False]), torch.ones(1, dtype=torch.float64))[0]

    w = conv.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(objective, (w,), eps=1e-6, atol=1e-5)


def test_logit_targets() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    assert torch.allclose(logit_target(logits, y, "logprob"), F.log_softmax(logits, 1)[[0, 1], y])
    assert torch.allclose(logit_target(logits, y, "logit"), torch.tensor([2.0, 1.0], dtype=torch.float64))
    margin = torch.stack([2.0 - torch.logsumexp(torch.tensor([0.5, -1.0]), 0), 1.0 - torch.logsumexp(torch.tensor([0.0, 3.0]), 0)])
    assert torch.allclose(logit_target(logits, y, "margin"), margin.double())
    gen = torch.Generator().manual_seed(0)
    r = logit_target(logits, y, "random", generator=gen)
    assert all(float(v) in logits[i].tolist() for i, v in enumerate(r))
    # a saturated model: the log-probability's gradient vanishes, the margin's does not
    a = torch.tensor([[30.0, 0.0]], requires_grad=True)
    head = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.5]])
    lab = torch.tensor([0])
    g_lp = logprob_gradient(a, a @ head.T, lab, "logprob")
    g_m = logprob_gradient(a, a @ head.T, lab, "margin")
    assert g_lp.abs().max() < 1e-6 and g_m.abs().max() > 0.5


def test_underflowed_gradients_are_left_out_not_nan() -> None:
    # A saturated log-probability gives gradients at the edge of float32 (denormals): their
    # direction is meaningless and 1/scale would be inf in the backward pass.
    w = torch.randn(2, 6, requires_grad=True)
    grads = torch.cat([torch.randn(1, 6), torch.full((1, 6), 1e-39)]) * w  # sample 1 underflowed
    cavs = F.normalize(torch.randn(1, 6), dim=1)
    index = torch.zeros(1, 2, dtype=torch.long)
    loss, per_term = concept_loss(grads, torch.tensor([0, 1]), cavs, index, torch.tensor([False]), torch.ones(1))
    loss.backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and torch.isfinite(loss)
    g0 = grads[0].detach()
    expected = (g0 @ cavs[0]).abs() / g0.norm()  # the mean over the one usable sample
    assert torch.allclose(per_term[0], expected, atol=1e-6)
    assert torch.count_nonzero(w.grad[1]) == 0
