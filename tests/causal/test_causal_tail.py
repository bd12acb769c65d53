"""The tail replay of the causal basis (cdistill.causal.tail): running only the part of a model
after the layer, on its cached output, gives the full patched forward's outputs and the same
basis; models it cannot cut fall back to the full forward (or raise with ``tail=True``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torchvision
from test_causal import C, Planted, _ThenReLU, _TupleModel, planted_inputs
from torch import Tensor, nn

from cdistill.causal import extract_causal_bases
from cdistill.causal.ablation import Ablation, ablate, to_rows, watch
from cdistill.causal.common import derangement
from cdistill.causal.tail import TailReplay, TailUnavailable, build_tail
from cdistill.errors import CdistillError
from cdistill.models.students import create_student
from cdistill.utils.capture import parse_layer


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=5).eval()


def _vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=5
    )
    nn.init.normal_(model.heads.head.weight)  # torchvision starts the head at zero: constant logits
    return model.eval()


def _mnist(name: str) -> nn.Module:
    torch.manual_seed(0)
    return create_student(name, image_size=16).eval()


def _images(channels: int, size: int, n: int = 4, seed: int = 0) -> Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


#: (name, model factory, layer, input) for the equality tests; the layers with a frontier read a
#: value from before the layer (a skip connection, a ViT block's residual stream).
CASES = [
    ("resnet18", _resnet, "layer4", lambda: _images(3, 64)),
    ("resnet18", _resnet, "layer3.1", lambda: _images(3, 64)),
    ("resnet18", _resnet, "layer4.0.conv1", lambda: _images(3, 64)),  # frontier: the skip
    ("vit", _vit, "encoder.layers.encoder_layer_0", lambda: _images(3, 16)),
    ("vit", _vit, "encoder.layers.encoder_layer_1.mlp", lambda: _images(3, 16)),  # frontier
    ("mnist_cnn", lambda: _mnist("mnist_cnn"), "conv2", lambda: _images(3, 16)),
    ("mnist_cnn", lambda: _mnist("mnist_cnn"), "pool1", lambda: _images(3, 16)),
    ("mnist_cnn_gray", lambda: _mnist("mnist_cnn_gray"), "fc1", lambda: _images(1, 16)),
    ("mnist_cnn_gray", lambda: _mnist("mnist_cnn_gray"), "input", lambda: _images(1, 16)),
]


def _recorded(model: nn.Module, layer: str, x: Tensor) -> TailReplay:
    replay = build_tail(model, layer)
    with torch.no_grad(), replay.recording():
        model(x)
        replay.record(x)
    return replay


def _ablation(
    model: nn.Module, layer: str, x: Tensor, mode: str, space: str, rank: int = 1, seed: int = 0
) -> Ablation:
    """A random unit direction (``rank`` 1) or orthonormal pair (2) of the layer's rows in
    ``space``, a mean off the rows' own and random resampling sources."""
    acts: list[Tensor] = []
    with torch.no_grad(), watch(model, layer, lambda a: acts.append(a.detach().clone())):
        model(x)
    rows = to_rows(acts[0], space)
    d = rows.shape[-1]
    g = torch.Generator().manual_seed(seed)
    direction = torch.linalg.qr(torch.randn(d, rank, generator=g))[0]
    return Ablation(
        mode,
        space,
        direction=direction[:, 0] if rank == 1 else direction,
        mean=rows.reshape(-1, d).mean(0) + torch.randn(d, generator=g),
        source=derangement(x.shape[0], g),
    )


@pytest.mark.parametrize(("name", "make", "layer", "inputs"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_tail_equals_the_full_patched_forward(
    name: str, make: Callable[[], nn.Module], layer: str, inputs: Callable[[], Tensor]
) -> None:
    model, x = make(), inputs()
    replay = _recorded(model, layer, x)
    with torch.no_grad():
        torch.testing.assert_close(replay.unpatched(0), model(x))
    for seed, (mode, space) in enumerate(
        [("mean", "position"), ("zero", "position"), ("resample", "position"), ("mean", "flatten")]
    ):
        for rank in (1, 2):  # one direction (the basis), a subspace (reliance's ablation)
            ablation = _ablation(model, layer, x, mode, space, rank, seed)
            with torch.no_grad(), ablate(model, layer, ablation):
                full = model(x)
            with torch.no_grad():
                tail = replay(0, ablation)
                torch.testing.assert_close(tail, full)
                assert not torch.allclose(tail, replay.unpatched(0)), (mode, space)  # it mattered
                # A second call starts from the cached values: nothing was changed in place.
                torch.testing.assert_close(replay(0, ablation), full)


def test_frontier_is_found_only_where_a_value_crosses_the_layer() -> None:
    assert build_tail(_resnet(), "layer4").frontier == ()
    assert build_tail(_resnet(), "layer4").head is None
    assert len(build_tail(_resnet(), "layer4.0.conv1").frontier) == 1  # the downsampled skip
    assert build_tail(_mnist("mnist_cnn"), "conv2").frontier == ()
    assert len(build_tail(_SkipAddsInPlace(), "planted.layer").frontier) == 1


class _SkipAddsInPlace(nn.Module):
    """The tail adds the layer's output into a skip value in place (``add_``; fx records
    ``skip += h`` as an out-of-place add)."""

    def __init__(self) -> None:
        super().__init__()
        self.planted = Planted(C, seed=17)

    def forward(self, x: Tensor) -> Tensor:
        skip = x * 2.0
        h = self.planted.layer(x)
        skip.add_(h)  # read below by an op that depends on h: the tail replays both
        return self.planted.head((skip + h).mean((2, 3)) @ self.planted.q)


@pytest.mark.parametrize("inplace", [False, True])
def test_tail_with_inplace_ops_and_a_tuple_output(inplace: bool) -> None:
    x = planted_inputs(8, (C, 4, 4)) + 0.1
    models = [
        (_ThenReLU(inplace).eval(), "planted.layer"),  # a later ReLU overwrites the layer's output
        (_TupleModel(Planted(C)).eval(), "layer:0"),
        (_SkipAddsInPlace().eval(), "planted.layer"),  # changes its frontier value in place
    ]
    for model, layer in models:
        replay = _recorded(model, layer, x)
        ablation = _ablation(model, layer, x, "mean", "position")
        with torch.no_grad(), ablate(model, layer, ablation):
            full = model(x)
        with torch.no_grad():
            torch.testing.assert_close(replay(0, ablation), full)
            torch.testing.assert_close(replay(0, ablation), full)  # the cache is intact
        assert parse_layer(layer)[1] == replay.index


def _bases(model: nn.Module, layer: str, inputs: list[Tensor], tail: bool | None, **kw: Any) -> tuple[Tensor, Tensor]:
    b = extract_causal_bases(model, layer, inputs, 2, max_iter=5, tail=tail, **kw)[layer]
    return b.basis, b.energies


@pytest.mark.parametrize(
    ("make", "layer", "inputs", "kw"),
    [
        (_resnet, "layer4", lambda: list(_images(3, 32, n=12).split(5)), {}),
        (_resnet, "layer4.0.conv1", lambda: list(_images(3, 32, n=8).split(4)), {"mode": "resample"}),
        (_vit, "encoder.layers.encoder_layer_1", lambda: list(_images(3, 16, n=8).split(4)), {"mode": "zero"}),
        (lambda: _mnist("mnist_cnn"), "conv2", lambda: list(_images(3, 16, n=8).split(3)), {}),
        (lambda: _mnist("mnist_cnn"), "fc1", lambda: list(_images(3, 16, n=8).split(4)), {"space": "flatten"}),
    ],
    ids=["resnet18-layer4", "resnet18-layer4.0.conv1-resample", "vit-block-zero", "mnist-conv2", "mnist-fc1-flatten"],
)
def test_basis_matches_the_full_forward(
    make: Callable[[], nn.Module], layer: str, inputs: Callable[[], list[Tensor]], kw: dict[str, Any]
) -> None:
    model = make().train()  # the extraction runs it in eval mode either way
    batches = inputs()
    basis, energies = _bases(model, layer, batches, True, **kw)
    full_basis, full_energies = _bases(model, layer, batches, False, **kw)
    assert model.training
    assert bool((energies > 0).all())
    torch.testing.assert_close(energies, full_energies, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(basis, full_basis, rtol=1e-4, atol=1e-5)


class _Branchy(nn.Module):
    """Python control flow on the data: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.planted = Planted(C, seed=11)

    def forward(self, x: Tensor) -> Tensor:
        if float(x.abs().sum()) > 0:
            x = x * 1.0
        return self.planted(x)


class _Twice(nn.Module):
    """The layer runs twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.planted = Planted(C, seed=12)

    def forward(self, x: Tensor) -> Tensor:
        return self.planted(self.planted.layer(x) * 0.5)


class _MutatesAcross(nn.Module):
    """An in-place op before the cut changes a value that an op after the layer reads."""

    def __init__(self) -> None:
        super().__init__()
        self.planted = Planted(C, seed=13)

    def forward(self, x: Tensor) -> Tensor:
        a = x * 1.0
        h = self.planted.layer(a)
        a.mul_(0.5)
        return self.planted.head((h + a).mean((2, 3)) @ self.planted.q)


class _MutatesAView(nn.Module):
    """As :class:`_MutatesAcross`, through a view taken before the change (not seen in the
    graph; the tail's outputs then differ from the model's, which the check catches)."""

    def __init__(self) -> None:
        super().__init__()
        self.planted = Planted(C, seed=14)

    def forward(self, x: Tensor) -> Tensor:
        a = x * 1.0
        view = a.view(a.shape)
        h = self.planted.layer(a)
        a.mul_(0.5)
        return self.planted.head((h + view).mean((2, 3)) @ self.planted.q)


@pytest.mark.parametrize(
    ("model", "layer", "reason"),
    [
        (_Branchy(), "planted.layer", "torch.fx cannot trace _Branchy"),
        (_Twice(), "planted.layer", "called 2 times"),
        (_MutatesAcross(), "planted.layer", "in-place op 'mul_' changes 'mul'"),
        (_MutatesAView(), "planted.layer", "tail's outputs differ from the model's on batch 0"),
    ],
    ids=["untraceable", "called-twice", "inplace-across", "inplace-through-a-view"],
)
def test_fallback_logs_why_and_gives_the_same_basis(
    model: nn.Module, layer: str, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    x = list(planted_inputs(16, (C, 4, 4), seed=15).split(16))
    with caplog.at_level(logging.INFO, logger="cdistill.causal.basis"):
        fallback = _bases(model, layer, x, None)
    lines = [r.getMessage() for r in caplog.records if "runs the whole model" in r.getMessage()]
    assert len(lines) == 1 and reason in lines[0], lines
    full = _bases(model, layer, x, False)
    torch.testing.assert_close(fallback, full, rtol=0, atol=0)
    with pytest.raises(CdistillError, match=reason) as err:
        _bases(model, layer, x, True)
    assert isinstance(err.value, TailUnavailable) and "tail=None" in str(err.value)
    assert not model.planted.layer._forward_hooks  # type: ignore[union-attr]


def test_tail_is_used_without_a_log_line(caplog: pytest.LogCaptureFixture) -> None:
    x = planted_inputs(16, (C, 4, 4), seed=16)
    with caplog.at_level(logging.INFO, logger="cdistill.causal.basis"):
        extract_causal_bases(Planted(C), "layer", x, 1, max_iter=2)
    assert not caplog.records
