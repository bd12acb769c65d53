"""Intrinsic image decomposition: losses, metrics, the module's concept loss and the experiments."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from cdistill.cli.train import train
from cdistill.errors import CdistillError
from cdistill.tasks.iid_metrics import lmse, si_mse, whdr
from cdistill.tasks.intrinsic import IntrinsicModule
from datamodules.intrinsic import IntrinsicDataModule

MakeCfg = Callable[..., DictConfig]
ROOT = Path(__file__).resolve().parents[2]
TERM_R = {"branch": "r", "layer": "r_dec.up1", "concept": "illumination", "negative": "material"}


def test_si_mse_is_scale_invariant() -> None:
    gen = torch.Generator().manual_seed(0)
    target, pred = torch.rand(4, 3, 8, 8, generator=gen), torch.rand(4, 3, 8, 8, generator=gen)
    base = si_mse(pred, target)
    for c in (0.1, 3.0, 100.0):
        torch.testing.assert_close(si_mse(c * pred, target), base)
    torch.testing.assert_close(si_mse(5 * target, target), torch.zeros(4), atol=1e-7, rtol=0)
    assert float(base.min()) > 0.01  # a wrong prediction is penalised
    mask = torch.zeros(4, 1, 8, 8)
    mask[..., :4] = 1
    fixed = pred.clone()
    fixed[..., :4] = 2 * target[..., :4]  # right (up to scale) inside the mask only
    torch.testing.assert_close(si_mse(fixed, target, mask), torch.zeros(4), atol=1e-7, rtol=0)


def test_lmse_hand_made_cases() -> None:
    target = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(1)) + 0.1
    assert float(lmse(3 * target, target, window=8)) == pytest.approx(0.0, abs=1e-6)
    assert float(lmse(torch.zeros_like(target), target, window=8)) == pytest.approx(1.0)
    # Scaling each half by its own factor: locally right, globally wrong.
    halves = target.clone()
    halves[..., :8] *= 4.0
    local, whole = float(lmse(halves, target, window=8)), float(lmse(halves, target, window=16))
    assert local < 0.5 * whole  # only the windows straddling the seam see two scales
    assert float(si_mse(halves, target)) > 1e-3
    with pytest.raises(CdistillError, match="window"):
        lmse(target, target, window=32)


def test_whdr_hand_made_cases() -> None:
    points = {1: (0.1, 0.5, True), 2: (0.9, 0.5, True), 3: (0.5, 0.5, False)}
    refl = torch.ones(3, 10, 10)
    refl[:, :, :5] = 0.5  # left half darker
    assert whdr(refl, points, [(1, 2, "1", 1.0)]) == 0.0
    assert whdr(refl, points, [(1, 2, "2", 1.0)]) == 1.0
    assert whdr(refl, points, [(1, 2, "E", 1.0)]) == 1.0
    # Weighted by darker_score; non-opaque points and zero weights are skipped.
    comps = [(1, 2, "1", 0.75), (1, 2, "2", 0.25), (1, 3, "2", 5.0), (2, 1, "1", 0.0)]
    assert whdr(refl, points, comps) == pytest.approx(0.25)
    flat = torch.ones(10, 10)
    assert whdr(flat, points, [(1, 2, "E", 1.0)]) == 0.0  # within delta: equal
    with pytest.raises(CdistillError, match="no judgement"):
        whdr(flat, points, [(1, 3, "E", 1.0)])


def _module(lambda_c: float = 1.0, terms: list[dict[str, object]] | None = None, **kw: object) -> IntrinsicModule:
    torch.manual_seed(0)
    return IntrinsicModule(
        student={"name": "iid_unet", "width": 4}, optimizer={"_target_": "torch.optim.Adam", "lr": 1e-3},
        lambda_c=lambda_c, concepts={"terms": [TERM_R] if terms is None else terms, "solver": "mean_diff",
                                     "min_accuracy": 0.0, "num_pairs": 16, **kw},
    )


def _batch() -> dict[str, torch.Tensor]:
    dm = IntrinsicDataModule(seed=0, image_size=16, num_train=8, num_val=2, num_test=2)
    return next(iter(torch.utils.data.DataLoader(dm.split("train"), batch_size=8)))


def _grad_at_layer(m: IntrinsicModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from cdistill.utils.capture import capture

    with capture(m.student, "r_dec.up1") as store:
        r, _ = m.student(batch["image"])
    per = si_mse(r, batch["reflectance"])
    (g,) = torch.autograd.grad(per.sum(), store["r_dec.up1"])
    return g.flatten(1)


def test_concept_loss_zero_when_orthogonal_and_grows_with_alignment() -> None:
    m, batch = _module(), _batch()
    g = _grad_at_layer(m, batch)
    mean = g.mean(0)
    values = []
    for mix in (0.0, 0.5, 1.0):
        # A CAV orthogonal to every sample's gradient (mix 0), then tilted towards the mean one.
        basis = torch.linalg.qr(g.T)[0]  # [d, B]: spans the gradients
        ortho = torch.randn(g.shape[1], generator=torch.Generator().manual_seed(0))
        ortho = ortho - basis @ (basis.T @ ortho)
        v = (1 - mix) * ortho / ortho.norm() + mix * mean / mean.norm()
        m.cavs.vectors = (v / v.norm())[None]
        m.cav_rows = torch.tensor([0])
        values.append(float(m.compute_losses(batch)["concept"].detach()))
    assert values[0] == pytest.approx(0.0, abs=1e-5)
    assert values[0] < values[1] < values[2] and values[2] > 0.2


def test_fit_artefacts_and_compute_losses() -> None:
    dm = IntrinsicDataModule(seed=0, image_size=16, num_train=8, num_val=2, num_test=2, num_concept_pairs=16)
    m = _module(terms=[TERM_R, {**TERM_R, "branch": "s", "layer": "s_dec.up1", "concept": "material",
                                "negative": "illumination"}])
    m.fit_artefacts(dm)
    assert len(m.cavs) == 2 and m.cav_rows.tolist() == [0, 1] and bool(m.artefacts_fitted)
    out = m.compute_losses(_batch())
    assert {"loss", "task", "r_mse", "s_mse", "concept", "concept/r_illumination", "concept/s_material"} <= set(out)
    expected = out["task"] + out["concept/r_illumination"] + out["concept/s_material"]
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()  # the double backward reaches the weights before the layer
    assert m.student.enc.inc[0].weight.grad is not None
    # Checkpoint round trip: the CAVs are buffers.
    fresh = _module(terms=list(m.terms))
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh.cavs.vectors, m.cavs.vectors)


def test_position_mode_and_bad_config() -> None:
    dm = IntrinsicDataModule(seed=0, image_size=16, num_train=8, num_val=2, num_test=2, num_concept_pairs=16)
    m = _module(cav_mode="position")
    m.fit_artefacts(dm)
    assert m.cavs.dim == 8  # r_dec.up1 has 2 * width channels
    assert float(m.compute_losses(_batch())["concept"]) >= 0
    for target in ("output", "random"):
        other = _module(cav_mode="position")
        other.hparams["target"] = target
        other.fit_artefacts(dm)
        out = other.compute_losses(_batch())
        assert float(out["concept"]) > 0
        out["loss"].backward()
    with pytest.raises(CdistillError, match=r"r_dec\.up1"):
        _module(terms=[{**TERM_R, "layer": "r_dec.upp1"}])
    with pytest.raises(CdistillError, match="branch"):
        _module(terms=[{**TERM_R, "branch": "x"}])
    with pytest.raises(CdistillError, match="terms"):
        _module(terms=[])
    with pytest.raises(CdistillError, match="negative"):
        _module(terms=[{k: v for k, v in TERM_R.items() if k != "negative"}])
    # The student/optimizer settings go through the classifier's fit_hparams: a bad rate fails when built.
    with pytest.raises(CdistillError, match=r"model\.optimizer\.lr=0"):
        IntrinsicModule(student={"name": "iid_unet", "width": 4}, optimizer={"_target_": "torch.optim.Adam", "lr": 0})


@pytest.mark.parametrize("experiment", ["iid/baseline", "iid/cd", "iid/cd_rs"])
def test_iid_experiment_fast_dev_run(make_cfg: MakeCfg, experiment: str) -> None:
    cfg = make_cfg(f"experiment={experiment}", "debug=fdr", "data.max_train_samples=64", "data.num_val=16",
                   "data.num_test=16", "data.num_concept_pairs=32", "data.image_size=16")
    metrics = train(cfg)
    for key in ("test/r_mse", "test/s_mse", "test/r_lmse", "test/r_ssim", "test_same_light/s_ssim", "val_relit/r_mse"):
        assert key in metrics, key
    assert 0 <= metrics["test/r_mse"] < 1 and -1 <= metrics["test/r_ssim"] <= 1
    assert ("train/concept" in metrics) == (experiment != "iid/baseline")


def test_iid_protocols_minimise(make_cfg: MakeCfg, tmp_path: Path) -> None:
    from cdistill.cli.train import protocol_checkpoints

    cfg = make_cfg("experiment=iid/baseline", "data.max_train_samples=32", "data.num_val=8", "data.num_test=8",
                   "data.image_size=16", "trainer.max_epochs=2")
    selectors = protocol_checkpoints(dict(cfg.protocols), str(tmp_path), [])
    assert {k: (v.monitor, v.mode) for k, v in selectors.items()} == {
        "strict": ("val/r_mse", "min"), "paper": ("val_relit/r_mse", "min")}
    metrics = train(cfg)
    assert {"strict/test/r_mse", "paper/test/r_mse", "last/test/r_mse"} <= set(metrics)
    assert (Path(cfg.paths.output_dir) / "checkpoints" / "paper" / "best.ckpt").is_file()


def test_bad_protocol_is_a_clear_error(make_cfg: MakeCfg) -> None:
    cfg = make_cfg("experiment=iid/baseline", "debug=fdr", "+protocols.bad={monitor: val/r_mse, mode: lowest}")
    with pytest.raises(CdistillError, match=r"protocols\.bad"):
        train(cfg)


@pytest.mark.slow
@pytest.mark.core
def test_iid_cd_under_ddp_sim(tmp_path: Path) -> None:
    from tests.cli.test_train import run_cli

    res = run_cli(["experiment=iid/cd", "trainer=ddp_sim", "debug=limit", "data.max_train_samples=64",
                   "data.num_val=16", "data.num_test=16", "data.num_concept_pairs=32", "data.image_size=16",
                   f"hydra.run.dir={tmp_path}/run"], tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"]["cavs.vectors"].shape[0] == 1
