"""Erasure hooks: fitting at layers of a network, applying and removing hooks, the module
integration (checkpoints, fast_dev_run of an erasure experiment) and DDP consistency."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import one_sgd_step_run, tiny_distill
from omegaconf import DictConfig, open_dict
from torch import Tensor, nn

from cdistill.cli.train import train
from cdistill.erasure import LowRankEraser
from cdistill.erasure.hooks import (
    ErasureSpec,
    bias_probe_accuracy,
    erase,
    fit_layer_erasers,
    specs_from_config,
)
from cdistill.errors import CdistillError
from cdistill.models.students import create_student
from cdistill.tasks.distill import ConceptDistillModule
from datamodules import ColorMNISTDataModule

ROOT = Path(__file__).resolve().parents[2]
ERASURE = {"layers": ["conv1"], "mode": "position", "method": "leace"}


def synthetic(n: int = 256, k: int = 3, seed: int = 0) -> list[dict[str, Tensor]]:
    """Batches of images whose colour (channel offsets) depends on a concept id, ~10% id -1."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, k, (n,), generator=g)
    z[torch.rand(n, generator=g) < 0.1] = -1
    colours = torch.randn(k + 1, 3, generator=g)
    x = torch.randn(n, 3, 12, 12, generator=g) + 2.0 * colours[z][:, :, None, None]
    return [{"image": x[i : i + 64], "bias": z[i : i + 64]} for i in range(0, n, 64)]


def two_convs() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(), nn.Flatten())


def rows_and_z(model: nn.Module, layer: str, batches: list[dict[str, Tensor]],
               erasers: dict[str, nn.Module], k: int) -> tuple[Tensor, Tensor]:
    """Per-position rows ``[M, C]`` at ``layer`` (erasers active) and one-hot z ``[M, k]``."""
    store: list[Tensor] = []
    with torch.no_grad(), erase(model, erasers, "position"):
        # Registered after the erasure hooks, so it records the erased output.
        handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: store.append(o.detach()))
        for b in batches:
            model(b["image"])
        handle.remove()
    xs, zs = [], []
    for act, b in zip(store, batches, strict=True):
        keep = b["bias"] >= 0
        rows = act[keep].movedim(1, -1)
        xs.append(rows.reshape(-1, rows.shape[-1]))
        zs.append(b["bias"][keep][:, None, None].expand(rows.shape[:-1]).reshape(-1))
    return torch.cat(xs), nn.functional.one_hot(torch.cat(zs), k).float()


def max_cross_cov(x: Tensor, z: Tensor) -> float:
    x64, z64 = x.double(), z.double()
    c = (x64 - x64.mean(0)).T @ (z64 - z64.mean(0)) / (len(x) - 1)
    return float(c.abs().max())


def test_hooks_are_removed_and_outputs_restored_bitwise() -> None:
    model = create_student(name="mnist_cnn")
    batches = synthetic()
    x = torch.randn(8, 3, 28, 28)
    before = model(x)
    imgs = [{"image": torch.randn(64, 3, 28, 28), "bias": b["bias"]} for b in batches]
    erasers = fit_layer_erasers(model, [ErasureSpec("conv1")], imgs, 3)
    with erase(model, erasers, "position"):
        during = model(x)
    assert not torch.equal(during, before)
    assert torch.equal(model(x), before)
    with pytest.raises(RuntimeError, match="boom"), erase(model, erasers, "position"):
        raise RuntimeError("boom")
    assert not model.conv1._forward_hooks
    assert torch.equal(model(x), before)


def test_position_erasure_zeroes_cross_covariance() -> None:
    model, batches = two_convs(), synthetic()
    x, z = rows_and_z(model, "0", batches, {}, 3)
    assert max_cross_cov(x, z) > 0.1  # the concept is there to start with
    erasers = fit_layer_erasers(model, [ErasureSpec("0")], batches, 3)
    x, z = rows_and_z(model, "0", batches, erasers, 3)
    assert x.dtype == torch.float32
    assert max_cross_cov(x, z) <= 1e-4


def test_sequential_fit_sees_earlier_erasers() -> None:
    model, batches = two_convs(), synthetic()
    both = fit_layer_erasers(model, [ErasureSpec("0"), ErasureSpec("2")], batches, 3)
    x, z = rows_and_z(model, "2", batches, both, 3)
    fitted = max_cross_cov(x, z)
    assert fitted <= 1e-4
    # Fitted on its own (layer 0 not erased), the layer-2 eraser is stale once layer 0 is erased.
    alone = fit_layer_erasers(model, [ErasureSpec("2")], batches, 3)
    x, z = rows_and_z(model, "2", batches, {"0": both["0"], "2": alone["2"]}, 3)
    assert max_cross_cov(x, z) > max(3e-4, 10 * fitted)
    assert all(not m._forward_hooks for m in model.modules())
    assert model.training  # the train/eval mode is restored


@pytest.mark.parametrize(("method", "extra"), [("inlp", {"options": {"n_iter": 2}}), ("p-clarc", {"positive": 0})])
def test_collecting_methods(method: str, extra: dict[str, Any]) -> None:
    model, batches = two_convs(), synthetic()
    spec = ErasureSpec("0", method=method, rows_per_sample=4, **extra)
    erasers = fit_layer_erasers(model, [spec], batches, 3)
    assert isinstance(erasers["0"], LowRankEraser) and erasers["0"].rank >= 1


def test_flatten_and_token_modes() -> None:
    model, batches = two_convs(), synthetic()
    erasers = fit_layer_erasers(model, [ErasureSpec("3", mode="flatten")], batches, 3)
    assert erasers["3"].dim == 8 * 8 * 8
    with erase(model, erasers, "flatten"):
        assert model(batches[0]["image"]).shape == (64, 512)
    tokens = nn.Sequential(nn.Linear(5, 7), nn.Identity())
    data = [{"image": torch.randn(16, 4, 5) + b["bias"][:16, None, None].float(), "bias": b["bias"][:16]} for b in batches]
    erasers = fit_layer_erasers(tokens, [ErasureSpec("0", mode="token")], data, 3)
    assert erasers["0"].dim == 7


def test_bad_input_is_clear() -> None:
    model, batches = two_convs(), synthetic()
    erasers = fit_layer_erasers(model, [ErasureSpec("0")], batches, 3)
    cnn = create_student(name="mnist_cnn")
    with pytest.raises(CdistillError, match="Close names: conv2, conv1"), erase(cnn, {"conv9": erasers["0"]}):
        pass
    assert not cnn.conv1._forward_hooks
    with pytest.raises(CdistillError, match="d=6"), erase(model, {"2": erasers["0"]}, "position"):
        model(batches[0]["image"])
    lstm = nn.LSTM(4, 4, batch_first=True)
    with pytest.raises(CdistillError, match="tuple"), erase(lstm, {"": LowRankEraser.identity(4)}, "token"):
        lstm(torch.randn(2, 3, 4))
    with pytest.raises(CdistillError, match="mode"):
        ErasureSpec("0", mode="pixel")
    with pytest.raises(CdistillError, match="Close names"):
        ErasureSpec("0", method="lace")
    with pytest.raises(CdistillError, match="positive"):
        specs_from_config({"layers": ["0"], "method": "p-clarc"})
    with pytest.raises(CdistillError, match="one-shot"):
        fit_layer_erasers(model, [ErasureSpec("0"), ErasureSpec("2")], iter(batches), 3)


@pytest.fixture(scope="module")
def dm(small_color_mnist: ColorMNISTDataModule) -> ColorMNISTDataModule:
    return small_color_mnist


def make(**kw: Any) -> ConceptDistillModule:
    module: ConceptDistillModule = tiny_distill(**({"layer": "conv2", "erasure": ERASURE} | kw))
    return module


def test_module_checkpoint_round_trip_bitwise(dm: ColorMNISTDataModule, tmp_path: Path) -> None:
    module = make()
    x = dm.split("val")[0]["image"][None]
    plain = module(x)  # before fitting: no erasure
    module.fit_artefacts(dm)
    erased = module(x)
    assert not torch.equal(plain, erased)
    torch.save(module.state_dict(), tmp_path / "m.pt")
    fresh = make()
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    for key, value in module.erasers.state_dict().items():
        assert torch.equal(fresh.erasers.state_dict()[key], value), key
    assert torch.equal(fresh(x), erased)
    probe = fresh.bias_probe(dm)
    assert probe["test/bias_probe_acc"] < probe["test/bias_probe_acc_unerased"]


def test_probe_accuracy_drops_to_near_chance(dm: ColorMNISTDataModule) -> None:
    model = create_student(name="mnist_cnn")
    loader = torch.utils.data.DataLoader(dm.split("train"), batch_size=150)
    erasers = fit_layer_erasers(model, [ErasureSpec("conv1")], loader, 10)
    before = bias_probe_accuracy(model, "conv1", "position", loader, 10)
    after = bias_probe_accuracy(model, "conv1", "position", loader, 10, erasers=erasers)
    assert before["acc"] > 0.9
    assert after["acc"] < before["chance"] + 0.15


def test_fast_dev_run_of_leace_experiment(make_cfg: Callable[..., DictConfig]) -> None:
    cfg = make_cfg("experiment=color_mnist/leace", "debug=fdr", "data.max_train_samples=200")
    with open_dict(cfg):
        cfg.logger = None
    metrics = train(cfg)
    for key in ("test/bias_probe_acc", "test/bias_probe_acc_unerased", "test/bias_probe_chance", "test/acc"):
        assert key in metrics, key
    # The model is the student with its erasers: they are saved beside student.pt.
    from cdistill.erasure.saved import saved_erasers

    erasers = saved_erasers(Path(cfg.paths.output_dir) / "student.pt")
    assert list(erasers) == ["conv1"] and erasers["conv1"][1] == "position" and erasers["conv1"][0].rank > 0


def _run(tmp: Path, name: str, extra: list[str]) -> dict[str, Tensor]:
    return one_sgd_step_run(tmp, name, "color_mnist/leace", extra)


@pytest.mark.slow
@pytest.mark.core
def test_ddp_sim_erasers_match_single_process(tmp_path: Path) -> None:
    """2 gloo processes (batch 16 each) == 1 process (batch 32): the same eraser, and after one
    SGD step through the erasure hook the same weights."""
    # No refit: the eraser in the checkpoint is the one fitted when training started, from
    # statistics each rank streamed over its own shard and summed across ranks.
    fixed = "model.erasure.refit_every_n_epochs=0"
    single = _run(tmp_path, "single", ["trainer=cpu", "data.batch_size=32", fixed])
    ddp = _run(tmp_path, "ddp", ["trainer=ddp_sim", "data.batch_size=16", fixed])
    keys = [k for k in single if k.startswith("erasers.conv1.")]
    assert {k.rsplit(".", 1)[1] for k in keys} == {"proj_left", "proj_right", "bias"}
    # The factors are unique only up to a rotation within the erased subspace (and the ranks
    # sum sharded statistics, equal up to rounding): compare the edit P = L R^T and the bias.
    def edit(state: dict[str, Tensor]) -> Tensor:
        return state["erasers.conv1.proj_left"].double() @ state["erasers.conv1.proj_right"].double().T

    assert single["erasers.conv1.proj_left"].shape == ddp["erasers.conv1.proj_left"].shape
    assert single["erasers.conv1.proj_left"].numel() > 0
    rel = torch.linalg.norm(edit(single) - edit(ddp)) / torch.linalg.norm(edit(single))
    assert rel < 1e-5, rel
    torch.testing.assert_close(single["erasers.conv1.bias"], ddp["erasers.conv1.bias"], atol=1e-5, rtol=1e-4)
    for key in (k for k in single if k.startswith("student.")):
        assert torch.allclose(single[key], ddp[key], atol=1e-5, rtol=1e-4), key


def test_refit_every_epoch_fits_on_the_final_weights(dm: ColorMNISTDataModule) -> None:
    """After training with refit_every_n_epochs=1 the erasers are those of the trained
    student; with no refit they stay those of the starting weights."""
    import pytorch_lightning as pl

    def fit(refit: int) -> tuple[ConceptDistillModule, dict[str, LowRankEraser]]:
        torch.manual_seed(0)
        module = make(erasure={**ERASURE, "refit_every_n_epochs": refit},
                      optimizer={"_target_": "torch.optim.SGD", "lr": 0.5})
        module.fit_artefacts(dm)
        start = {k: LowRankEraser(v.proj_left, v.proj_right, v.bias) for k, v in module.erasers.items()}
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, datamodule=dm)
        return module, start

    module, start = fit(1)
    loader = torch.utils.data.DataLoader(dm.split("train"), batch_size=module.hparams["fit_batch_size"])
    fresh = fit_layer_erasers(module.student, [ErasureSpec("conv1")], loader, 10)["conv1"]
    assert not torch.allclose(start["conv1"].projection(), module.erasers["conv1"].projection())
    torch.testing.assert_close(module.erasers["conv1"].projection(), fresh.projection().float())
    frozen, start = fit(0)
    assert torch.equal(frozen.erasers["conv1"].projection(), start["conv1"].projection())
