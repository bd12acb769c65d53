"""``last.ckpt`` is the latest epoch, and SIGKILL + resume repeats the uninterrupted run exactly."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

from cdistill.cli.train import train

ROOT = Path(__file__).resolve().parents[2]
MakeCfg = Callable[..., DictConfig]


def _state_of(ckpt: dict, dirpath: Path) -> dict:
    """The saved state of the checkpoint callback writing to ``dirpath``."""
    states = [v for k, v in ckpt["callbacks"].items() if isinstance(v, dict) and v.get("dirpath") == str(dirpath)]
    assert len(states) == 1, list(ckpt["callbacks"])
    return states[0]


def test_last_ckpt_is_the_last_epoch_when_the_best_is_not(make_cfg: MakeCfg, tmp_path: Path) -> None:
    # The monitored checkpoint keeps epoch 0 (smallest epoch); a protocol keeps the latest epoch.
    cfg = make_cfg(
        "experiment=color_mnist/baseline", "data.max_train_samples=128", "+trainer.limit_val_batches=1",
        "trainer.max_epochs=3", "test=false", "callbacks.model_checkpoint.monitor=epoch",
        "callbacks.model_checkpoint.mode=min", "~protocols", "+protocols.latest={monitor: epoch, mode: max}",
    )
    train(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["epoch_000.ckpt", "last.ckpt"]
    last = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2
    # Written after every other checkpoint callback of the epoch: their states include it.
    assert float(_state_of(last, ckpts / "latest")["best_model_score"]) == 2


def test_mid_epoch_last_ckpt_when_configured(make_cfg: MakeCfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "experiment=color_mnist/baseline", "data.max_train_samples=128", "+trainer.limit_val_batches=1",
        "trainer.max_epochs=1", "test=false", "callbacks.last_checkpoint.every_n_train_steps=1",
        "+trainer.max_steps=1",
    )
    train(cfg)  # 2 steps per epoch, stopped after the first: only a mid-epoch save can exist
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 1


def _limited(make_cfg: MakeCfg, out: Path, *extra: str) -> DictConfig:
    cfg = make_cfg(
        "experiment=color_mnist/baseline", "data.max_train_samples=320", "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1", "trainer.max_epochs=2", *extra,
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def test_resume_continues_in_the_checkpoints_run(make_cfg: MakeCfg, tmp_path: Path) -> None:
    """The selectors keep their state (no 'dirpath has changed'), files are overwritten (no
    best-v1.ckpt), and the artefact-free baseline's metrics.json equals the uninterrupted one."""
    full = train(_limited(make_cfg, tmp_path / "full"))
    train(_limited(make_cfg, tmp_path / "part", "trainer.max_epochs=1", "test=false"))
    resumed = train(_limited(make_cfg, tmp_path / "elsewhere", f"ckpt_path={tmp_path / 'part/checkpoints/last.ckpt'}"))
    assert not (tmp_path / "elsewhere").exists()
    assert resumed == full
    assert json.loads((tmp_path / "part" / "metrics.json").read_text()) == json.loads(
        (tmp_path / "full" / "metrics.json").read_text()
    )
    files = sorted(str(p.relative_to(tmp_path / "part")) for p in (tmp_path / "part").rglob("*.ckpt"))
    assert files == sorted(str(p.relative_to(tmp_path / "full")) for p in (tmp_path / "full").rglob("*.ckpt"))


# --------------------------------------------------------------------------- SIGKILL and resume
def _cli(args: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900, check=False)


def _metrics(run: Path) -> dict:
    """metrics.json with the run's own directory replaced (file names recorded there may differ)."""
    return json.loads((run / "metrics.json").read_text().replace(str(run.resolve()), "<run>"))


def kill_and_resume(tmp: Path, args: Sequence[str], kill_step: int, by_path: bool) -> tuple[dict, dict, Path]:
    """Run uninterrupted; run again but SIGKILL mid-epoch at ``kill_step``; resume from its
    last.ckpt (by path into a new Hydra folder, or ``ckpt_path=last`` in the same folder).

    Returns:
        The uninterrupted and the resumed run's metrics.json, and the killed run's folder.
    """
    common = [*args, "trainer.enable_progress_bar=false", "logger=csv"]
    full = _cli([*common, f"hydra.run.dir={tmp / 'full'}"], tmp)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = _cli([*common, f"hydra.run.dir={tmp / 'killed'}", "+callbacks.killer._target_=resume_killer.KillAtStep",
                   f"+callbacks.killer.step={kill_step}"], tmp)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp / "killed" / "metrics.json").exists()
    last = tmp / "killed" / "checkpoints" / "last.ckpt"
    assert 0 < torch.load(last, weights_only=True)["global_step"] < kill_step  # an epoch end before the kill
    where = [f"ckpt_path={last}", f"hydra.run.dir={tmp / 'resume'}"] if by_path else [
        "ckpt_path=last", f"hydra.run.dir={tmp / 'killed'}"]
    resumed = _cli([*common, *where], tmp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "dirpath has changed" not in resumed.stderr
    return _metrics(tmp / "full"), _metrics(tmp / "killed"), tmp / "killed"


_TINY = ["data.max_train_samples=256", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
         "trainer.max_epochs=3"]  # 4 steps per epoch: a kill at step 6 is mid-epoch 1


@pytest.mark.slow
@pytest.mark.core
def test_sigkill_resume_is_exact_cd_best(tmp_path: Path) -> None:
    """Random logit target, sampled foreground mask, artefact metrics (cav/acc_student)."""
    full, resumed, _ = kill_and_resume(tmp_path, ["experiment=color_mnist/cd_best", *_TINY], 6, by_path=False)
    assert "cav/acc_student" in full
    assert resumed == full


@pytest.mark.slow
@pytest.mark.core
def test_sigkill_resume_is_exact_default_recipe(tmp_path: Path) -> None:
    """The default recipe: concept images and counterfactual values drawn by the module's
    generator every step (a resumed run must draw the same ones)."""
    full, resumed, _ = kill_and_resume(tmp_path, ["experiment=marker_mnist/cd", *_TINY], 6, by_path=False)
    assert resumed == full


@pytest.mark.slow
@pytest.mark.core
def test_sigkill_resume_is_exact_erasure_with_refits(tmp_path: Path) -> None:
    """LEACE refitted after every epoch; resumed by path: continues in the killed run's folder."""
    full, resumed, run = kill_and_resume(tmp_path, ["experiment=color_mnist/leace", *_TINY], 6, by_path=True)
    assert "test/bias_probe_acc" in full
    assert resumed == full
    assert not list(run.rglob("*-v1.ckpt"))
    assert not (tmp_path / "resume" / "metrics.json").exists()


@pytest.mark.slow
@pytest.mark.core
def test_sigkill_resume_is_exact_probe_and_rrclarc(tmp_path: Path) -> None:
    """The adversarial probe (its weights and Adam moments, sized in setup before the checkpoint is
    loaded into it; not refitted on resume) and RR-ClArC (signal CAVs, random classes drawn by the
    module's generator)."""
    args = ["experiment=color_mnist/cd", "model=adv_probe", "model.lambda_rr=3", "model.probe.per_set=2",
            "model.probe.warm_steps=5", *_TINY]
    full, resumed, run = kill_and_resume(tmp_path, args, 6, by_path=False)
    assert resumed == full
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["state_dict"]["probe.weight"].shape == (10, 20 * 12 * 12)
    student = torch.load(run / "student.pt", weights_only=True)
    assert not [k for k in student if "probe" in k or "signal" in k]


@pytest.mark.slow
def test_sigkill_resume_is_exact_iid_cd(tmp_path: Path) -> None:
    """Random Jacobian projections and CAV refits every 5 steps (one before the kill, one after)."""
    args = ["experiment=iid/cd", "data.max_train_samples=128", "data.num_val=16", "data.num_test=16",
            "data.num_concept_pairs=32", "data.image_size=16", "model.concepts.min_accuracy=0", "trainer.max_epochs=3"]
    full, resumed, _ = kill_and_resume(tmp_path, args, 6, by_path=False)
    assert resumed == full


@pytest.mark.slow
def test_sigkill_resume_is_exact_faces_cd(tmp_path: Path) -> None:
    """CAV refreshes every 5 steps (one before the kill, one after) on the faces proxy."""
    args = ["experiment=faces/cd_gradient", "data.n_train=200", "data.n_valid=40", "data.n_test=40",
            "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1", "trainer.max_epochs=3",
            "model.concepts.refresh_every_n_steps=5"]
    full, resumed, _ = kill_and_resume(tmp_path, args, 6, by_path=True)
    assert resumed == full


def test_random_draws_come_from_the_checkpointed_generator(make_cfg: MakeCfg) -> None:
    from cdistill.cli.train import instantiate

    torch.manual_seed(0)  # the module's generator is seeded from the run's seed
    model = instantiate(make_cfg("experiment=color_mnist/cd_best").model)
    model.artefact_metrics = {"cav/acc_student": 0.75}
    ckpt: dict = {}
    model.on_save_checkpoint(ckpt)
    labels, images = torch.zeros(32, dtype=torch.long), torch.rand(4, 3, 28, 28)
    before = torch.get_rng_state()
    drawn, target = model.objective.logit_target(model, labels, 10)
    mask = model.objective.local_mask(model, images)
    assert target == "logit" and torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched

    torch.manual_seed(1)
    fresh = instantiate(make_cfg("experiment=color_mnist/cd_best").model)
    assert not torch.equal(fresh.objective.logit_target(fresh, labels, 10)[0], drawn)
    fresh.on_load_checkpoint(torch.load(_saved(ckpt), weights_only=True))
    assert fresh.artefact_metrics == {"cav/acc_student": 0.75}
    assert torch.equal(fresh.objective.logit_target(fresh, labels, 10)[0], drawn)
    assert torch.equal(fresh.objective.local_mask(fresh, images), mask)


def _saved(obj: dict) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


def test_ckpt_path_last_finds_the_latest_run(tmp_path: Path) -> None:
    from cdistill.cli.train import checkpoint_run_dir, resolve_ckpt_path

    runs = tmp_path / "logs" / "task" / "runs"
    for i, name in enumerate(("2026-01-02_00-00-00", "2026-01-01_00-00-00")):
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "checkpoints" / "last.ckpt").write_bytes(b"x")
        os.utime(runs / name / "checkpoints" / "last.ckpt", (1e9 + i, 1e9 + i))
    found = resolve_ckpt_path("last", str(tmp_path / "new"), str(runs))
    assert found == str(runs / "2026-01-01_00-00-00" / "checkpoints" / "last.ckpt")  # written last
    assert checkpoint_run_dir(found) == (runs / "2026-01-01_00-00-00").resolve()
    assert checkpoint_run_dir(str(tmp_path / "elsewhere.ckpt")) is None
