"""Causal basis extraction (cdistill.causal): planted subspaces, ablation modes, spaces, token
layers, streamed inputs, clear errors and DDP agreement.

The planted models read only a known 2-d subspace Q of the layer's channels. Their inputs are
built so that the summarised activation has an exactly white sample covariance and no odd
moments (antithetic pairs x, -x), and the logits stay small: then the energy-maximising
directions lie in Q up to fourth-order terms. (Far from that regime the maximiser may tilt
out of Q: an independent component of the ablated coefficient adds noise to the logits,
which raises the expected KL of a saturated softmax. That is the method, not an error.)
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from cdistill.causal import CausalBasis, extract_causal_bases
from cdistill.errors import CdistillError, NonFiniteError

C = 6  # channels of the planted layer


def _whiten(f: Tensor) -> Tensor:
    """Centre ``f [N, d]`` and make its sample covariance the identity."""
    fc = f - f.mean(0)
    lam, u = torch.linalg.eigh(fc.T @ fc / f.shape[0])
    return fc @ u @ torch.diag(lam.rsqrt()) @ u.T


class Planted(nn.Module):
    """``layer`` (identity) -> logits depending only on ``features @ q``, q ``[d, 2]``.

    ``layout``: ``map`` (features: the channels averaged over positions of ``[B, C, H, W]``),
    ``tokens`` (averaged over the tokens of ``[B, T, C]``) or ``flat`` (the flattened map).
    """

    q: Tensor

    def __init__(self, d: int, layout: str = "map", seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g))
        self.register_buffer("q", q)
        self.layout = layout
        self.layer = nn.Identity()
        self.head = nn.Linear(2, 3)
        with torch.no_grad():  # distinct gains along the two planted directions
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.7], [0.0, -0.7]]))
            self.head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        h = self.layer(x)
        if self.layout == "map":
            f = h.mean((2, 3))
        elif self.layout == "tokens":
            f = h.mean(1)
        else:
            f = h.flatten(1)
        return self.head(f @ self.q)


def planted_inputs(
    n: int, shape: tuple[int, ...], layout: str = "map", scale: float = 0.2, seed: int = 1
) -> Tensor:
    """``2n`` inputs ``[2n, *shape]`` whose planted features are white (times ``scale``)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    if layout == "map":
        f = x.mean((2, 3))
        x = x + (_whiten(f) * scale - f)[:, :, None, None]
    elif layout == "tokens":
        f = x.mean(1)
        x = x + (_whiten(f) * scale - f)[:, None, :]
    else:
        x = (_whiten(x.flatten(1)) * scale).reshape(x.shape)
    return torch.cat([x, -x])


def principal_cosines(q: Tensor, basis: Tensor) -> Tensor:
    """Cosines of the principal angles between the column spans of ``q`` and ``basis``."""
    qb, _ = torch.linalg.qr(basis)
    return torch.linalg.svdvals(q.T @ qb)


def column_cosines(a: Tensor, b: Tensor) -> Tensor:
    """``|cos|`` between matching unit columns of ``a`` and ``b``."""
    return (a * b).sum(0).abs()


def check_basis(b: CausalBasis, d: int) -> None:
    assert b.basis.shape[0] == d
    assert b.basis.shape[1] == b.energies.shape[0]
    gram = b.basis.T @ b.basis
    assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-5)
    assert bool((b.energies[:-1] >= b.energies[1:]).all())


@pytest.fixture(scope="module")
def planted() -> tuple[Planted, Tensor]:
    return Planted(C), planted_inputs(64, (C, 4, 4))


# ---- 1. planted subspace ---------------------------------------------------------------------


def test_recovers_planted_subspace(planted: tuple[Planted, Tensor]) -> None:
    model, x = planted
    b = extract_causal_bases(model, "layer", x, 3)["layer"]
    assert (b.layer, b.mode, b.space) == ("layer", "mean", "position")
    check_basis(b, C)
    assert bool((principal_cosines(model.q, b.basis[:, :2]) > 0.99).all())
    assert float(b.energies[1]) > 1e-3  # both planted directions matter
    assert abs(float(b.energies[2])) < 1e-6  # the rest does not


def test_min_energy_stops_after_the_planted_directions(planted: tuple[Planted, Tensor]) -> None:
    model, x = planted
    b = extract_causal_bases(model, "layer", x, 3, min_energy=1e-4)["layer"]
    check_basis(b, C)
    assert b.basis.shape == (C, 2)
    assert bool((principal_cosines(model.q, b.basis) > 0.99).all())


def test_model_left_as_it_was(planted: tuple[Planted, Tensor]) -> None:
    model, x = planted
    model.train()
    model.head.bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    extract_causal_bases(model, ["layer"], x, 1, max_iter=5)
    assert model.training and model.head.training
    assert model.head.weight.requires_grad and not model.head.bias.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not model.layer._forward_hooks  # the ablation hook is gone
    model.head.bias.requires_grad_(True)
    model.eval()


def test_tiny_energies_still_converge() -> None:
    # Logits ~40x smaller: energies ~1e-5, far below float32 eps x 100. The loss scale keeps
    # L-BFGS's tolerances relative, so it does not stop after the first step.
    model = Planted(C)
    x = planted_inputs(64, (C, 4, 4), scale=0.005, seed=3)
    b = extract_causal_bases(model, "layer", x, 2)["layer"]
    assert float(b.energies[1]) < 1e-4
    assert bool((principal_cosines(model.q, b.basis) > 0.99).all())


def test_dead_channel_is_not_a_starting_point() -> None:
    # Channel 0 is constant: ablating e_0 changes nothing and the energy's gradient vanishes
    # there, so starting from it would return e_0 with zero energy.
    model = Planted(C, seed=7)
    x = planted_inputs(64, (C, 4, 4), seed=9)
    x[:, 0] = 0.0
    b = extract_causal_bases(model, "layer", x, 2)["layer"]
    assert float(b.energies[1]) > 1e-4
    assert float(b.basis[0].abs().max()) < 0.9  # neither vector is (close to) e_0


class _ThenReLU(nn.Module):
    """``layer`` (a copy of x), then ReLU, then a planted head on the channels' means."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.planted = Planted(C, seed=10)
        self.relu = nn.ReLU(inplace=inplace)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.planted.layer(x * 1.0))  # a fresh tensor: the input stays intact
        return self.planted.head(h.mean((2, 3)) @ self.planted.q)


def test_mean_is_read_before_an_inplace_op(planted: tuple[Planted, Tensor]) -> None:
    # A later ReLU(inplace=True) overwrites the layer's output; the mean for r must be the
    # layer's own (pre-ReLU), so both models have the same energies.
    _, x = planted
    x = x + 0.1  # some channels' means change under a ReLU
    a = extract_causal_bases(_ThenReLU(False), "planted.layer", x, 2)["planted.layer"]
    b = extract_causal_bases(_ThenReLU(True), "planted.layer", x, 2)["planted.layer"]
    assert torch.allclose(a.energies, b.energies, rtol=1e-4)


class _TupleLayer(nn.Module):
    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x * 1.0, x.sum()


class _TupleModel(nn.Module):
    """The planted model with a layer that returns ``(h, extra)``: spec ``"layer:0"``."""

    def __init__(self, planted: Planted) -> None:
        super().__init__()
        self.planted = planted
        self.layer = _TupleLayer()

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.layer(x)
        return self.planted(h)


def test_tuple_output_element(planted: tuple[Planted, Tensor]) -> None:
    model, x = planted
    plain = extract_causal_bases(model, "layer", x, 2)["layer"]
    b = extract_causal_bases(_TupleModel(model), "layer:0", x, 2)["layer:0"]
    assert bool((column_cosines(plain.basis, b.basis) > 0.999).all())
    assert torch.allclose(plain.energies, b.energies, rtol=1e-4)
    with pytest.raises(CdistillError, match="element 2 does not exist"):
        extract_causal_bases(_TupleModel(model), "layer:2", x, 1)


# ---- 2. ablation modes -----------------------------------------------------------------------


def test_modes_agree_on_the_planted_subspace(planted: tuple[Planted, Tensor]) -> None:
    model, _ = planted
    # More inputs: the resampled difference h_other - h has a white covariance only up to a
    # finite-sample cross term, which tilts the weaker planted direction by ~1/sqrt(N).
    x = planted_inputs(256, (C, 4, 4), seed=2)
    bases = {m: extract_causal_bases(model, "layer", x, 2, mode=m)["layer"] for m in ("mean", "zero", "resample")}
    for mode, b in bases.items():
        assert b.mode == mode
        check_basis(b, C)
        assert bool((principal_cosines(model.q, b.basis) > 0.99).all()), mode
    # Zero-mean activations: zeroing h·v is the same edit as setting it to its mean.
    assert torch.allclose(bases["zero"].energies, bases["mean"].energies, rtol=1e-3)
    # Resampling moves h·v by the difference of two inputs: twice the variance, more energy.
    assert bool((bases["resample"].energies > 1.5 * bases["mean"].energies).all())


def test_zero_differs_from_mean_on_offset_activations(planted: tuple[Planted, Tensor]) -> None:
    model, x = planted
    offset = 0.5 * model.q[:, 0]  # a mean inside the planted subspace
    shifted = x + offset[None, :, None, None]
    mean = extract_causal_bases(model, "layer", shifted, 2, mode="mean")["layer"]
    zero = extract_causal_bases(model, "layer", shifted, 2, mode="zero")["layer"]
    # Zeroing h·v also removes the offset along the first planted direction: more energy
    # there; the second planted direction has no offset, so its energy hardly moves.
    assert float(zero.energies[0]) > 2 * float(mean.energies[0])
    assert float(zero.energies[1]) == pytest.approx(float(mean.energies[1]), rel=0.2)
    assert bool((principal_cosines(model.q, zero.basis) > 0.99).all())


# ---- 3. position and flatten spaces ----------------------------------------------------------


def test_flatten_space_recovers_a_planted_map_subspace() -> None:
    shape = (2, 3, 3)
    d = 2 * 3 * 3
    model = Planted(d, "flat", seed=3)
    x = planted_inputs(64, shape, "flat", scale=0.1, seed=4)  # 18 dims: keep the logits small
    b = extract_causal_bases(model, "layer", x, 3, space="flatten")["layer"]
    assert b.space == "flatten"
    check_basis(b, d)
    assert bool((principal_cosines(model.q, b.basis[:, :2]) > 0.99).all())
    assert abs(float(b.energies[2])) < 1e-6
    # The same layer in position space: d is the channel count.
    pos = extract_causal_bases(model, "layer", x, 2, max_iter=10)["layer"]
    assert pos.space == "position" and pos.basis.shape == (2, 2)


# ---- 4. ViT tokens ---------------------------------------------------------------------------


def test_token_layer_in_position_space() -> None:
    model = Planted(C, "tokens", seed=5)
    x = planted_inputs(64, (7, C), "tokens", scale=0.1, seed=6)  # [B, T=7, C=6]
    b = extract_causal_bases(model, "layer", x, 3, space="position")["layer"]
    check_basis(b, C)
    assert bool((principal_cosines(model.q, b.basis[:, :2]) > 0.99).all())
    assert abs(float(b.energies[2])) < 1e-6


# ---- 5. streamed inputs ----------------------------------------------------------------------


class _Counting(nn.Module):
    """Wraps a model and records the batch sizes it sees."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.sizes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x.shape[0], int):  # not the symbolic size of the tail replay's fx trace
            self.sizes.append(x.shape[0])
        return self.inner(x)


def test_streamed_batches_match_the_concatenated_tensor(planted: tuple[Planted, Tensor]) -> None:
    model, x = planted
    whole = extract_causal_bases(model, "layer", x, 2)["layer"]
    counting = _Counting(model)
    batches = [(x[i : i + 40], torch.zeros(40)) for i in range(0, x.shape[0], 40)]  # (x, y) pairs
    streamed = extract_causal_bases(counting, "inner.layer", batches, 2)["inner.layer"]
    assert max(counting.sizes) == 40  # never concatenated
    assert bool((column_cosines(whole.basis, streamed.basis) > 0.999).all())
    assert torch.allclose(whole.energies, streamed.energies, rtol=1e-4)
    mappings = [{"image": x[i : i + 64]} for i in range(0, x.shape[0], 64)]
    from_maps = extract_causal_bases(model, "layer", mappings, 2)["layer"]
    assert bool((column_cosines(whole.basis, from_maps.basis) > 0.999).all())


def test_shuffled_or_one_shot_inputs_are_refused(planted: tuple[Planted, Tensor]) -> None:
    model, x = planted

    class Shuffled:
        def __iter__(self) -> Iterator[Tensor]:
            perm = torch.randperm(x.shape[0])
            return iter(x[perm].split(32))

    with pytest.raises(CdistillError, match="changed between passes"):
        extract_causal_bases(model, "layer", Shuffled(), 1, tail=False)
    # The tail replay reads the inputs once (the reference pass caches what it needs), so
    # the order of the batches cannot disagree between passes.
    check_basis(extract_causal_bases(model, "layer", Shuffled(), 1, tail=True)["layer"], C)
    with pytest.raises(CdistillError, match="one-shot iterator"):
        extract_causal_bases(model, "layer", (b for b in x.split(32)), 1)


# ---- 6. errors -------------------------------------------------------------------------------


def test_errors_name_the_problem_and_the_fix(planted: tuple[Planted, Tensor]) -> None:
    model, x = planted
    with pytest.raises(CdistillError, match=r"Unknown layer 'layr'.*Close names: layer"):
        extract_causal_bases(model, "layr", x, 1)
    with pytest.raises(CdistillError, match=r"k=7 .*d=6.*k <= 6"):
        extract_causal_bases(model, "layer", x, 7)
    with pytest.raises(CdistillError, match="k >= 1"):
        extract_causal_bases(model, "layer", x, 0)
    with pytest.raises(CdistillError, match=r"Unknown ablation mode 'mena'.*mean"):
        extract_causal_bases(model, "layer", x, 1, mode="mena")
    with pytest.raises(CdistillError, match=r"Unknown activation space 'flat'.*flatten"):
        extract_causal_bases(model, "layer", x, 1, space="flat")
    with pytest.raises(CdistillError, match="No inputs"):
        extract_causal_bases(model, "layer", x[:0], 1)
    with pytest.raises(CdistillError, match="No inputs"):
        extract_causal_bases(model, "layer", [], 1)
    with pytest.raises(CdistillError, match="at least 2 inputs"):
        extract_causal_bases(model, "layer", [x[:1]], 1, mode="resample")


def test_non_finite_outputs_are_reported(planted: tuple[Planted, Tensor]) -> None:
    model, x = planted
    bad = x.clone()
    bad[3, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="Non-finite model outputs"):
        extract_causal_bases(model, "layer", bad, 1)

    class Overflows(nn.Module):  # finite unless the layer is edited
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Identity()

        def forward(self, x: Tensor) -> Tensor:
            h = self.layer(x).mean((2, 3))
            return torch.where(h.abs() < 1e-3, torch.log(h * 0), h)[:, :3]

    with pytest.raises(NonFiniteError, match="Non-finite energy"):
        extract_causal_bases(Overflows(), "layer", x + 1, 1, mode="zero")


# ---- GPU -------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_the_models_device(planted: tuple[Planted, Tensor]) -> None:
    model, x = planted
    gpu = Planted(C).cuda()
    b = extract_causal_bases(gpu, "layer", x, 2)["layer"]  # CPU inputs move to the model
    assert b.basis.is_cuda and b.energies.is_cuda
    cpu = extract_causal_bases(model, "layer", x, 2)["layer"]
    assert bool((column_cosines(b.basis.cpu(), cpu.basis) > 0.999).all())


# ---- 7. DDP ----------------------------------------------------------------------------------


def _ddp_inputs() -> Tensor:
    # Halves of different scale, so that either half alone gives other energies than both.
    x = planted_inputs(64, (C, 4, 4), seed=8)
    return torch.cat([x[::2], 2 * x[1::2]])


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        x = _ddp_inputs()
        half = x[:64] if rank == 0 else x[64:]
        b = extract_causal_bases(Planted(C), "layer", list(half.split(24)), 3, mode="mean")["layer"]
        torch.save({"basis": b.basis, "energies": b.energies}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_hold_identical_bases(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert torch.equal(r0["basis"], r1["basis"]) and torch.equal(r0["energies"], r1["energies"])
    # The ranks optimised the objective over all inputs, not their own half.
    full = extract_causal_bases(Planted(C), "layer", _ddp_inputs(), 3)["layer"]
    assert bool((column_cosines(full.basis[:, :2], r0["basis"][:, :2]) > 0.999).all())
    assert torch.allclose(full.energies[:2], r0["energies"][:2], rtol=1e-4)
    half = extract_causal_bases(Planted(C), "layer", _ddp_inputs()[:64], 3)["layer"]
    assert not torch.allclose(half.energies[:2], r0["energies"][:2], rtol=1e-2)
