"""Training runs end to end: experiments, bad input, resume, checkpoints, CLI, sweeps."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import DictConfig, open_dict

from cdistill.cli.train import train
from cdistill.errors import CdistillError

ROOT = Path(__file__).resolve().parents[2]
MakeCfg = Callable[..., DictConfig]
# Classification experiments on data that needs no files (the IID ones report errors, not
# accuracies: tests/tasks/test_intrinsic.py; Waterbirds and CelebA read a dataset from disk and run on
# fixtures written in their layouts: tests/datamodules/test_waterbirds_celeba.py).
EXPERIMENTS = sorted(
    str(p.relative_to(ROOT / "conf" / "experiment").with_suffix(""))
    for p in (ROOT / "conf" / "experiment").rglob("*.yaml")
    if p.parent.name not in ("iid", "waterbirds", "celeba", "folder")  # folder: tests/cli/test_own_data_readme.py
)


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )


# Teacher experiments: a tiny offline teacher whose CAVs may miss the gate, or a tiny in-code ViT
# instead of DINO (tests/teacher/test_teacher.py covers the teacher stage); faces: a small proxy.
_TINY_AE = ["model.teacher.train.images=128", "model.teacher.train.epochs=1", "model.teacher.train.width=4",
            "model.teacher.pca_dims=4", "model.teacher.mapping.epochs=3", "model.concepts.min_accuracy=0"]
_TINY_FACES = ["data.n_train=200", "data.n_valid=40", "data.n_test=40"]
_TINY_VIT = ["model.teacher.name=timm:vit_tiny_patch16_224", "model.teacher.checkpoint_path=null",
             "model.teacher.layer=blocks.0", "model.teacher.image_size=32", "model.teacher.pca_dims=4",
             "model.teacher.mapping.epochs=2",
             *(f"+model.teacher.model_kwargs.{k}={v}" for k, v in
               {"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2}.items())]
SHRINK = {e: (_TINY_AE if "teacher" in e else []) for e in EXPERIMENTS if not e.startswith("faces/")}
SHRINK |= {e: _TINY_FACES + (_TINY_VIT if "teacher" in e else []) for e in EXPERIMENTS if e.startswith("faces/")}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_fast_dev_run(make_cfg: MakeCfg, experiment: str) -> None:
    cfg = make_cfg(f"experiment={experiment}", "debug=fdr", "data.max_train_samples=256", *SHRINK.get(experiment, []))
    metrics = train(cfg)
    assert "test/acc" in metrics and 0.0 <= metrics["test/acc"] <= 1.0
    assert "val_reversed/acc" in metrics


def test_wrong_channels_is_a_clear_error(make_cfg: MakeCfg) -> None:
    cfg = make_cfg("data=decoy_mnist", "model=mnist_cnn", "debug=fdr")
    with pytest.raises(CdistillError, match="in_chans=1"):
        train(cfg)


def test_unknown_model_is_a_clear_error(make_cfg: MakeCfg) -> None:
    cfg = make_cfg("model.student.name=mnist_cnnn", "debug=fdr")
    with pytest.raises(CdistillError, match="mnist_cnn"):
        train(cfg)


def test_missing_resume_checkpoint_is_a_clear_error(make_cfg: MakeCfg, tmp_path: Path) -> None:
    cfg = make_cfg("debug=fdr", f"ckpt_path={tmp_path / 'nope.ckpt'}")
    with pytest.raises(CdistillError, match="ckpt_path"):
        train(cfg)


def _limited(make_cfg: MakeCfg, out: Path, *extra: str) -> DictConfig:
    cfg = make_cfg(
        "experiment=color_mnist/baseline", "logger=csv",
        "data.max_train_samples=320", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
        "trainer.max_epochs=2", *extra,
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def test_resume_matches_uninterrupted_run(make_cfg: MakeCfg, tmp_path: Path) -> None:
    full = train(_limited(make_cfg, tmp_path / "full"))
    train(_limited(make_cfg, tmp_path / "part", "trainer.max_epochs=1", "test=false"))
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    resumed = train(_limited(make_cfg, tmp_path / "part2", f"ckpt_path={last}"))
    for key in ("val/acc", "val_reversed/loss", "test/acc", "test/loss"):
        assert resumed[key] == pytest.approx(full[key], abs=1e-6), key
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    # Resuming continues in the checkpoint's run directory ("part"), not in "part2".
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k


def test_checkpoint_carries_config_and_loads_weights_only(make_cfg: MakeCfg, tmp_path: Path) -> None:
    train(_limited(make_cfg, tmp_path / "r", "trainer.max_epochs=1", "test=false"))
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=True)
    cfg = yaml.safe_load(ckpt["cdistill"]["config"])
    assert cfg["model"]["student"]["name"] == "mnist_cnn"
    assert ckpt["hyper_parameters"]["student"]["name"] == "mnist_cnn"
    assert "optimizer_states" in ckpt and "loops" in ckpt
    from cdistill.tasks.classifier import ClassifierModule

    model = ClassifierModule.load_from_checkpoint(tmp_path / "r" / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(model.student.fc2.weight, ckpt["state_dict"]["student.fc2.weight"])


def test_cli_run_and_multirun(tmp_path: Path) -> None:
    res = run_cli(["experiment=decoy_mnist/baseline", "debug=fdr", f"hydra.run.dir={tmp_path}/run"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_readme_multirun_runs_as_written(tmp_path: Path) -> None:
    # README: `python train.py -m experiment=color_mnist/baseline seed=0,1,2`, here with
    # debug=fdr and without hydra.sweep.dir (the default sweep dir, under ./logs, must resolve).
    res = run_cli(["-m", "experiment=color_mnist/baseline", "seed=0,1", "debug=fdr"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    (sweep,) = (tmp_path / "logs").glob("*/multiruns/*")
    assert (sweep / "0" / "metrics.json").is_file() and (sweep / "1" / "metrics.json").is_file()


# Prints the run and sweep dirs that two composes in one process resolve, with the clock fixed
# to one second (as for two runs started in the same second).
_RUN_DIRS = """
import json, sys
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
import cdistill.cli.train  # registers cdistill's resolvers
dirs = []
for _ in range(2):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=sys.argv[1], version_base="1.3"):
        # after Hydra's own registration of `now`
        OmegaConf.register_new_resolver("now", lambda pattern: "2000-01-01_00-00-00", replace=True)
        cfg = compose("train", ["paths.log_dir=/logs"], return_hydra_config=True)
    dirs.append([cfg.hydra.run.dir, cfg.hydra.sweep.dir])
print(json.dumps(dirs))
"""


def test_run_dirs_differ_between_processes_started_in_the_same_second(tmp_path: Path) -> None:
    procs = [
        subprocess.run([sys.executable, "-c", _RUN_DIRS, str(ROOT / "conf")], cwd=ROOT, capture_output=True,
                       text=True, timeout=120, check=False)
        for _ in range(2)
    ]
    for p in procs:
        assert p.returncode == 0, p.stderr[-3000:]
    (a1, a2), (b1, b2) = (json.loads(p.stdout.strip().splitlines()[-1]) for p in procs)
    assert a1 == a2 and b1 == b2  # stable within a process (DDP ranks, repeated composes)
    assert a1[0] != b1[0] and a1[1] != b1[1]  # distinct between processes: run and sweep dirs
    assert a1[0].startswith("/logs/train/runs/2000-01-01_00-00-00")


def render_sweep_command(sweep: dict, program_args: list[str]) -> list[str]:
    """Render a wandb sweep `command` as the agent would for the first value of each parameter."""
    args_no_hyphens = []
    for key, spec in sweep["parameters"].items():
        value = spec["values"][0] if "values" in spec else spec.get("value", spec.get("min"))
        args_no_hyphens.append(f"{key}={value}")
    out: list[str] = []
    for token in sweep["command"]:
        if token == "${env}":
            continue
        if token in ("${interpreter}", "python"):
            out.append(sys.executable)
        elif token == "${program}":
            out.append(str(ROOT / sweep["program"]))
        elif token == "${args_no_hyphens}":
            out.extend(args_no_hyphens + program_args)
        else:
            out.append(token)
    return out


@pytest.mark.parametrize("sweep_file", sorted((ROOT / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_sweep_command_runs(sweep_file: Path, tmp_path: Path) -> None:
    sweep = yaml.safe_load(sweep_file.read_text())
    assert "${args_no_hyphens}" in sweep["command"]
    # Tiny limits rather than debug=fdr, which switches the loggers off.
    shrink = ["data.max_train_samples=256", "data.num_workers=0", "trainer.max_epochs=1",
              "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
              "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}/run"]
    pipeline = sweep["program"] == "pipeline.py"
    if pipeline:  # one seed is enough to check that the command runs
        shrink += ["pipeline.seeds=[0]", "pipeline.tcav.enabled=false", "pipeline.base_epochs=1"]
    cmd = render_sweep_command(sweep, shrink)
    env = {**os.environ, "WANDB_MODE": "offline"}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "run" / ("pipeline.json" if pipeline else "metrics.json")).is_file()
    # The agent reads the sweep's metric from the wandb run: it must have been logged there.
    runs = list((tmp_path / "run").rglob("offline-run-*/*.wandb"))
    assert runs and any(sweep["metric"]["name"].encode() in r.read_bytes() for r in runs)


@pytest.mark.slow
@pytest.mark.core
def test_ddp_sim_runs_without_extra_output_dirs(tmp_path: Path) -> None:
    res = run_cli(
        ["experiment=color_mnist/baseline", "trainer=ddp_sim", "debug=limit", "data.max_train_samples=256",
         f"hydra.run.dir={tmp_path}/logs/run", f"paths.log_dir={tmp_path}/logs"], tmp_path, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["run"]
    assert (tmp_path / "logs" / "run" / "metrics.json").is_file()
    hydra_dirs = [p for p in (tmp_path / "logs" / "run").rglob(".hydra")]
    assert len(hydra_dirs) == 1
    assert not list((tmp_path / "logs" / "run").glob("*/.hydra"))


@pytest.mark.slow
@pytest.mark.core
def test_ddp_sim_ranks_share_the_default_run_dir(tmp_path: Path) -> None:
    # No hydra.run.dir: rank 1 must write into rank 0's <time>_<tag> folder, not draw its own tag.
    res = run_cli(["experiment=color_mnist/baseline", "trainer=ddp_sim", "debug=limit", "data.max_train_samples=256"],
                  tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    (run,) = (tmp_path / "logs").glob("*/runs/*")
    assert (run / "metrics.json").is_file() and len(list(run.rglob(".hydra"))) == 1


def test_pipeline_writes_report(make_cfg: MakeCfg, tmp_path: Path) -> None:
    from cdistill.cli.pipeline import run_pipeline

    cfg = make_cfg("experiment=color_mnist/cd", "debug=fdr", "data.max_train_samples=128", "pipeline.seeds=[0]")
    with open_dict(cfg):  # debug=fdr switches the loggers off; the summary must reach this one
        cfg.logger = {"csv": {"_target_": "pytorch_lightning.loggers.CSVLogger", "save_dir": "${paths.output_dir}",
                              "name": "csv"}}
    records = run_pipeline(cfg)
    out = Path(cfg.paths.output_dir)
    assert (out / "seed0" / "base" / "student.pt").is_file()
    assert (out / "seed0" / "cd" / "student.pt").is_file()
    md = (out / "pipeline.md").read_text()
    assert "| bias TCAV score | fraction |" in md and "| test acc (strict selection) |" in md
    with (out / "pipeline.csv").open() as f:
        rows = list(csv.DictReader(f))
    paper = next(r for r in rows if r["key"] == "paper/test/acc")
    assert paper["unit"] == "%" and float(paper["cd_mean"]) == pytest.approx(100 * records[0]["cd"]["paper/test/acc"])
    (logged,) = out.glob("csv/version_*/metrics.csv")
    with logged.open() as f:
        (summary,) = list(csv.DictReader(f))
    assert float(summary["cd/paper/test/acc"]) == pytest.approx(records[0]["cd"]["paper/test/acc"])
    assert float(summary["base/tcav"]) == pytest.approx(records[0]["base"]["tcav"])
    assert 0.0 <= records[0]["base"]["tcav"] <= 1.0 and 0.0 <= records[0]["cd"]["tcav"] <= 1.0
    # reliance before -> after, beside TCAV (debug's small measure.reliance settings)
    assert "| concept-only agreement (concept images -> their class) | fraction |" in md
    assert "| bias-subspace ablation KL | nats |" in md
    saved = json.loads((out / "pipeline.json").read_text())
    for stage in ("base", "cd"):
        assert 0.0 <= saved[0][stage]["reliance/concept_agreement"] <= 1.0
        assert saved[0][stage]["reliance/ablation_kl"] >= 0.0 and "reliance/causal_share_in_bias" in saved[0][stage]
        detail = saved[0]["reliance"][stage]
        assert len(detail["agreement"]) == 10 and len(detail["energies"]) == len(detail["shares"]) == 2
    assert float(summary["cd/reliance/ablation_kl"]) == pytest.approx(records[0]["cd"]["reliance/ablation_kl"])
    for png in ("reliance_spectrum.png", "reliance_agreement.png"):
        assert (out / png).stat().st_size > 1000
    base = torch.load(out / "seed0" / "base" / "student.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in base.values())
    assert "fc2.weight" in base
