"""Activation capture: hooks by module path, cleanup, clear errors, collection."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor, nn

from cdistill.errors import CdistillError
from cdistill.utils.capture import (
    capture,
    collect_activations,
    eval_mode,
    parse_layer,
    resolve_module,
    stop_after,
)


def small_cnn() -> Any:  # an nn.Sequential; Any lets tests reach its named children
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 4, 3, padding=1),
            relu1=nn.ReLU(),
            block=nn.Sequential(OrderedDict(conv2=nn.Conv2d(4, 8, 3, stride=2, padding=1))),
            relu2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(8, 3),
        )
    )


class Pair(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x, 2 * x


class Out(NamedTuple):
    main: Tensor
    aux: Tensor


class NamedPair(nn.Module):
    def forward(self, x: Tensor) -> Out:
        return Out(x, 3 * x)


class PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.pair = Pair()
        self.named = NamedPair()

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.pair(self.lin(x))
        return self.named(a + b).aux


def n_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_capture_matches_manual_forward() -> None:
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    with capture(model, ["relu1", "block.conv2"]) as acts:
        out = model(x)
    expected = model.block(model.relu1(model.conv1(x)))
    assert acts["block.conv2"].shape == (2, 8, 4, 4)
    torch.testing.assert_close(acts["block.conv2"], expected)
    torch.testing.assert_close(out, model(x))
    assert set(acts) == {"relu1", "block.conv2"}
    assert acts["relu1"].grad_fn is not None  # graph kept unless detach=True


def test_detach_drops_graph() -> None:
    model = small_cnn()
    with capture(model, "relu1", detach=True) as acts:
        model(torch.randn(1, 3, 8, 8))
    assert acts["relu1"].grad_fn is None


def test_hooks_removed_after_use_and_after_exceptions() -> None:
    model = small_cnn()
    with capture(model, ["conv1", "fc"]):
        assert n_hooks(model) == 2
        model(torch.randn(1, 3, 8, 8))
    assert n_hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"), capture(model, "conv1"):
        raise RuntimeError("boom")
    assert n_hooks(model) == 0
    # A failing hook (non-finite activation) also leaves no hooks behind.
    with pytest.raises(CdistillError, match="conv1"), capture(model, "conv1", check_finite=True):
        model(torch.full((1, 3, 8, 8), float("nan")))
    assert n_hooks(model) == 0


def test_wrong_path_lists_close_names_and_registers_nothing() -> None:
    model = small_cnn()
    with pytest.raises(CdistillError, match=r"block\.conv2") as err, capture(model, ["conv1", "block.conv3"]):
        pass
    assert "named_modules" in str(err.value)
    assert n_hooks(model) == 0
    with pytest.raises(CdistillError, match="conv1"):
        resolve_module(model, "conv")
    assert resolve_module(model, "block.conv2") is model.block.conv2
    assert resolve_module(model, "") is model


def test_tuple_output_needs_an_index() -> None:
    model = PairNet()
    x = torch.randn(3, 4)
    with pytest.raises(CdistillError, match=r"pair:0"), capture(model, "pair"):
        model(x)
    assert n_hooks(model) == 0
    with capture(model, "pair:1") as acts:
        model(x)
    torch.testing.assert_close(acts["pair:1"], 2 * model.lin(x))
    assert parse_layer("blocks.1:0") == ("blocks.1", 0)
    assert parse_layer("blocks.1") == ("blocks.1", None)
    with pytest.raises(CdistillError, match="drop the ':index'"), capture(model, "lin:0"):
        model(x)
    # grad_leaf swaps the picked element for a leaf, also inside a namedtuple.
    with capture(model, "named:1", grad_leaf=True) as acts:
        out = model(x)
    (grad,) = torch.autograd.grad(out.sum(), acts["named:1"])
    torch.testing.assert_close(grad, torch.ones_like(grad))


def test_check_finite_names_the_layer() -> None:
    model = small_cnn()
    x = torch.randn(1, 3, 8, 8)
    x[0, 0, 0, 0] = float("inf")
    with pytest.raises(CdistillError, match=r"NaN/Inf.*'relu1'"), capture(model, "relu1", check_finite=True):
        model(x)
    with capture(model, "relu1") as acts:  # unchecked by default
        model(x)
    assert not torch.isfinite(acts["relu1"]).all()


def test_reading_before_forward_is_a_clear_error() -> None:
    model = small_cnn()
    with capture(model, "conv1") as acts:
        with pytest.raises(CdistillError, match="no output yet"):
            acts["conv1"]
        with pytest.raises(CdistillError, match="conv1"):
            acts["conv2"]


def test_grad_leaf_gives_activation_gradients_of_a_frozen_model() -> None:
    model = small_cnn().requires_grad_(False)
    x = torch.randn(2, 3, 8, 8)
    with capture(model, "relu2", grad_leaf=True) as acts:
        out = model(x)
    a = acts["relu2"]
    (grad,) = torch.autograd.grad(out[:, 1].sum(), a)
    # relu2 -> mean pool -> fc: d out_1 / d a = fc.weight[1] / (H * W) at every position.
    expected = (model.fc.weight[1] / 16)[None, :, None, None].expand_as(a)
    torch.testing.assert_close(grad, expected)


def test_vit_blocks_token_activations() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
        embed_dim=32, depth=2, num_heads=2, num_classes=10,
    )
    x = torch.randn(2, 3, 32, 32)
    with capture(vit, "blocks.1") as acts:
        vit(x)
    assert acts["blocks.1"].shape == (2, 17, 32)  # 16 patches + class token
    flat = collect_activations(vit, "blocks.1", [x])
    torch.testing.assert_close(flat, acts["blocks.1"].reshape(2, -1).detach())
    with pytest.raises(CdistillError, match=r"blocks\.1"):
        resolve_module(vit, "blocks.7")


def test_collect_activations_eval_mode_restore_and_early_stop() -> None:
    model = small_cnn()
    model.add_module("bn", nn.BatchNorm1d(3))  # after fc: must not run (early stop)
    model.train()
    model.pool.eval()  # a deliberately frozen submodule stays in eval mode
    seen_modes: list[bool] = []
    model.conv1.register_forward_hook(lambda m, i, o: seen_modes.append(m.training))
    calls: list[int] = []
    model.fc.register_forward_hook(lambda m, i, o: calls.append(1))
    xs = [torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)]
    loader = [(xs[0], torch.zeros(2)), (xs[1], torch.zeros(3))]
    acts = collect_activations(model, "relu2", loader)
    assert acts.shape == (5, 8 * 4 * 4)
    assert not acts.requires_grad
    assert seen_modes == [False, False]
    assert calls == []  # the forward stopped after relu2
    assert model.training and model.conv1.training and not model.pool.training
    manual = torch.cat([model.relu2(model.block(model.relu1(model.conv1(x)))) for x in xs])
    torch.testing.assert_close(acts, manual.reshape(5, -1).detach())
    unflat = collect_activations(model, "relu2", xs, flatten=False)
    assert unflat.shape == (5, 8, 4, 4)
    with pytest.raises(CdistillError, match="No batches"):
        collect_activations(model, "relu2", [])


def test_eval_mode_restores_each_module_also_after_an_error() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2))
    model.train()
    model[2].eval()  # a deliberately frozen submodule stays frozen
    try:
        with eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert [m.training for m in model.modules()] == [True, True, True, False]


def test_stop_after_skips_the_rest_and_removes_its_hook() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    seen: list[torch.Size] = []
    model[2].register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    out = None
    with capture(model, "0") as store, stop_after(model[0]):
        out = model(torch.ones(4, 2))  # never returns: the forward stops after model[0]
    assert out is None and store["0"].shape == (4, 3) and not seen
    model(torch.ones(4, 2))
    assert seen == [torch.Size([4, 1])]  # the stop hook is gone
