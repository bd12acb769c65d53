"""K-means, class prototypes, the prototype loss, EMA refresh and DDP consistency."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from cdistill.errors import CdistillError
from cdistill.objective.prototypes import PrototypeFitter, Prototypes, kmeans


def blobs(centers: Tensor, n: int, std: float, seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    k, d = centers.shape
    assign = torch.arange(k).repeat_interleave(n)
    return centers[assign] + std * torch.randn(k * n, d, generator=g), assign


def test_kmeans_k1_is_exactly_the_mean() -> None:
    x = torch.randn(37, 5)
    centers, assign = kmeans(x, 1)
    assert torch.equal(centers[0], x.mean(0))
    assert torch.equal(assign, torch.zeros(37, dtype=torch.long))


def test_kmeans_recovers_separated_clusters() -> None:
    g = torch.Generator().manual_seed(0)
    true = 10 * torch.randn(4, 6, generator=g)
    x, labels = blobs(true, n=50, std=0.3, seed=1)
    centers, assign = kmeans(x, 4, generator=torch.Generator().manual_seed(3))
    match = torch.cdist(true, centers).argmin(1)
    assert sorted(match.tolist()) == [0, 1, 2, 3]  # one centre per true cluster
    torch.testing.assert_close(centers[match], true, atol=0.15, rtol=0)
    assert torch.equal(match[labels], assign)  # every point in its own cluster
    again, _ = kmeans(x, 4, generator=torch.Generator().manual_seed(3))
    assert torch.equal(again, centers)  # seeded: reproducible


def test_kmeans_handles_duplicates_and_too_few_points() -> None:
    x = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    centers, assign = kmeans(x, 3)  # only two distinct points: one cluster ends up empty
    assert torch.isfinite(centers).all()
    assert {tuple(c) for c in centers.tolist()} <= {(0.0, 0.0), (1.0, 1.0)}
    assert torch.equal(assign[:5], assign[:1].expand(5))
    with pytest.raises(CdistillError, match="k=4, n=3"):
        kmeans(x[:3], 4)


def test_fitter_k1_gives_class_means_over_several_updates() -> None:
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(90, 4, 3, generator=g)
    labels = torch.arange(3).repeat(30)
    fitter = PrototypeFitter(num_classes=3, K=1)
    for chunk in range(3):
        fitter.update(acts[chunk * 30 : (chunk + 1) * 30], labels[chunk * 30 : (chunk + 1) * 30])
    protos = fitter.compute()
    assert protos.centers.shape == (3, 1, 12)
    for c in range(3):
        torch.testing.assert_close(protos.centers[c, 0], acts[labels == c].reshape(-1, 12).mean(0), atol=1e-6, rtol=0)


def test_fitter_k2_finds_each_class_clusters_and_caps_memory() -> None:
    g = torch.Generator().manual_seed(0)
    modes = 8 * torch.randn(3, 2, 5, generator=g)  # class c has modes modes[c, 0], modes[c, 1]
    xs, ys = [], []
    for c in range(3):
        x, _ = blobs(modes[c], n=40, std=0.2, seed=c)
        xs.append(x[torch.randperm(80, generator=g)])
        ys.append(torch.full((80,), c))
    fitter = PrototypeFitter(num_classes=3, K=2, max_per_class=60)
    x_all, y_all = torch.cat(xs), torch.cat(ys)
    order = torch.randperm(240, generator=g)
    for chunk in order.split(50):
        fitter.update(x_all[chunk], y_all[chunk])
    assert fitter._kept is not None and fitter._kept.tolist() == [60, 60, 60]
    protos = fitter.compute()
    for c in range(3):
        match = torch.cdist(modes[c], protos.centers[c]).argmin(1)
        assert sorted(match.tolist()) == [0, 1]
        torch.testing.assert_close(protos.centers[c][match], modes[c], atol=0.2, rtol=0)


def test_fitter_errors_name_the_class() -> None:
    fitter = PrototypeFitter(num_classes=4, K=1)
    fitter.update(torch.randn(6, 3), torch.tensor([0, 1, 1, 3, 0, 3]))
    with pytest.raises(CdistillError, match=r"class\(es\) \[2\]"):
        fitter.compute()
    with pytest.raises(CdistillError, match=r"\[0, 4\)"):
        fitter.update(torch.randn(2, 3), torch.tensor([0, 4]))
    few = PrototypeFitter(num_classes=2, K=3)
    few.update(torch.randn(5, 3), torch.tensor([0, 0, 0, 1, 1]))
    with pytest.raises(CdistillError, match=r"\[1\] have fewer samples than K=3"):
        few.compute()
    with pytest.raises(CdistillError, match="before any update"):
        PrototypeFitter(2).compute()


def test_loss_formula_and_gradient() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 4, 10, generator=g)
    protos = Prototypes(centers)
    acts = torch.randn(7, 2, 5, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 1])
    loss = protos.loss(acts, labels)
    flat = acts.reshape(7, 10)
    direct = (flat[:, None, :] - centers[labels]).pow(2).sum((1, 2)) / 10
    torch.testing.assert_close(loss, direct)
    (grad,) = torch.autograd.grad(loss.sum(), acts)
    pbar = protos.mean_center(labels)
    torch.testing.assert_close(pbar, centers.mean(1)[labels])
    torch.testing.assert_close(grad.reshape(7, 10), (2 * 4 / 10) * (flat - pbar).detach())
    with pytest.raises(CdistillError, match="d=6"):
        protos.loss(torch.randn(2, 6), labels[:2])
    with pytest.raises(CdistillError, match="not fitted"):
        Prototypes().loss(flat, labels)


def test_ema_update_blends_and_matches_clusters() -> None:
    old = torch.tensor([[[0.0, 0.0], [10.0, 10.0]]])
    protos = Prototypes(old)
    new = torch.tensor([[[11.0, 11.0], [1.0, 1.0]]])  # same clusters, swapped order
    protos.ema_update_(new, weight=0.3)
    torch.testing.assert_close(protos.centers, torch.tensor([[[0.3, 0.3], [10.3, 10.3]]]))
    single = Prototypes(torch.zeros(2, 1, 3))
    single.ema_update_(Prototypes(torch.ones(2, 1, 3)), weight=0.3)
    torch.testing.assert_close(single.centers, torch.full((2, 1, 3), 0.3))
    empty = Prototypes()
    empty.ema_update_(new)
    assert torch.equal(empty.centers, new)
    with pytest.raises(CdistillError, match="do not match"):
        single.ema_update_(torch.ones(3, 1, 3))


def test_state_dict_round_trip_into_unfitted_module(tmp_path: Path) -> None:
    protos = Prototypes(torch.randn(3, 2, 4))
    torch.save(protos.state_dict(), tmp_path / "p.pt")
    fresh = Prototypes()
    fresh.load_state_dict(torch.load(tmp_path / "p.pt", weights_only=True))
    assert torch.equal(fresh.centers, protos.centers)
    assert (fresh.num_classes, fresh.k, fresh.dim) == (3, 2, 4)
    fresh.broadcast_()  # no-op without torch.distributed
    assert torch.equal(fresh.centers, protos.centers)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(rank)  # every rank sees different data
        acts, labels = torch.randn(40, 6, generator=g) + rank, torch.arange(2).repeat(20)
        mean_fitter = PrototypeFitter(2, K=1)
        mean_fitter.update(acts, labels)
        km_fitter = PrototypeFitter(2, K=3, seed=0)
        km_fitter.update(acts, labels)
        late = Prototypes()  # an unfitted module receives rank 0's shape and values
        if rank == 0:
            late = Prototypes(torch.full((2, 1, 4), 7.0))
        late.broadcast_()
        torch.save(
            {"mean": mean_fitter.compute().centers, "km": km_fitter.compute().centers,
             "late": late.centers},
            Path(out) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_hold_identical_prototypes(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in ("mean", "km", "late"):
        assert torch.equal(r0[key], r1[key]), key
    # K=1 is the exact mean over both ranks' data.
    acts = [torch.randn(40, 6, generator=torch.Generator().manual_seed(r)) + r for r in (0, 1)]
    labels = torch.arange(2).repeat(20)
    for c in range(2):
        expected = torch.cat([a[labels == c] for a in acts]).mean(0)
        torch.testing.assert_close(r0["mean"][c, 0], expected, atol=1e-6, rtol=0)
    assert torch.equal(r0["late"], torch.full((2, 1, 4), 7.0))
