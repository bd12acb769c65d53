"""The pipeline's pre-flight checks (``pipeline.dry_run``) and ``pipeline.base_ckpt``: every
error the pipeline would raise after base training shows before any training."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from cdistill.cli.pipeline import run_pipeline
from cdistill.cli.preflight import preflight
from cdistill.errors import CdistillError
from cdistill.models.students import create_student
from cdistill.objective.cav_fitter import CAVGateError

MakeCfg = Callable[..., DictConfig]
CD = ("experiment=color_mnist/cd_gradient", "debug=fdr", "data.max_train_samples=128", "pipeline.seeds=[0]")


def test_dry_run_checks_and_trains_nothing(make_cfg: MakeCfg) -> None:
    cfg = make_cfg(*CD, "pipeline.dry_run=true")
    assert run_pipeline(cfg) == []
    out = Path(cfg.paths.output_dir)
    text = (out / "dry_run.txt").read_text()
    assert "every check passed" in text and "color_9 vs grey" not in text  # pairs summarised
    assert "layer 'conv2' exists" in text and "CAV gate: not checked" in text
    assert not (out / "seed0").exists()


@pytest.mark.parametrize(("override", "message"), [
    ("model.concepts.terms=[{concept: 'colour_{y}', negative: grey}]", r"'colour_0'.*close: color_0"),
    ("model.concepts.terms=[{concept: 'color_{y}', negative: gray}]", r"'gray' \(close: grey\)"),
    ("model.layer=conv3", r"Unknown layer 'conv3'"),
    ("pipeline.tcav.concept='hue_{y}'", r"pipeline.tcav.concept.*'hue_0'"),
    ("pipeline.tcav.random=grey", r"pool split into >= 2 sets"),
    ("pipeline.tcav.layer=pool3", r"pipeline.tcav.layer: Unknown layer 'pool3'"),
    ("model.concepts.spec=concepts/nothing.yaml", r"does not exist"),
    ("model.student.in_chans=1", r"3-channel images"),
    ("pipeline.base_ckpt=/no/such/base", r"pipeline.base_ckpt='/no/such/base' does not exist"),
])
def test_bad_config_fails_before_training(make_cfg: MakeCfg, override: str, message: str) -> None:
    cfg = make_cfg(*CD, override)
    with pytest.raises(CdistillError, match=message):
        run_pipeline(cfg)
    assert not (Path(cfg.paths.output_dir) / "seed0").exists()


def _student_file(tmp_path: Path, **kw: int) -> Path:
    path = tmp_path / "base" / "student.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = create_student("mnist_cnn", **kw).state_dict()
    state["fc2.bias"].fill_(5.0)  # a mark no fresh initialisation has
    torch.save(state, path)
    return path


def test_base_ckpt_of_another_architecture_fails_early(make_cfg: MakeCfg, tmp_path: Path) -> None:
    path = _student_file(tmp_path, num_classes=2)
    with pytest.raises(CdistillError, match="does not match the student architecture"):
        run_pipeline(make_cfg(*CD, f"pipeline.base_ckpt={path}", "pipeline.dry_run=true"))


def test_gate_failure_shows_in_the_dry_run_with_a_base_model(make_cfg: MakeCfg, tmp_path: Path) -> None:
    path = _student_file(tmp_path)
    lines = preflight(make_cfg(*CD, f"pipeline.base_ckpt={path.parent}"))
    assert any(line.startswith("CAV gate on the base model at 'conv2': 10/10 pairs pass") for line in lines)
    cfg = make_cfg(*CD, f"pipeline.base_ckpt={path.parent}", "pipeline.dry_run=true", "model.concepts.min_accuracy=1.01")
    with pytest.raises(CAVGateError, match=r"under the gate.*color_0 vs grey 1\.000"):
        run_pipeline(cfg)


def test_base_ckpt_is_tested_not_trained(make_cfg: MakeCfg, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _student_file(tmp_path)
    cfg = make_cfg(*CD, f"pipeline.base_ckpt={tmp_path / 'base'}", "pipeline.tcav.enabled=false",
                   "pipeline.reliance.enabled=false")
    caplog.set_level(logging.INFO, logger="cdistill.cli.pipeline")
    (record,) = run_pipeline(cfg)
    # the reliance switch off: one INFO line, no measures, no plots
    assert [r.message for r in caplog.records if "reliance" in r.message] == [
        "reliance measures skipped: pipeline.reliance.enabled=false"]
    assert "reliance" not in record and not any(k.startswith("reliance/") for k in record["cd"])
    assert not list(Path(cfg.paths.output_dir).glob("reliance_*.png"))
    out = Path(cfg.paths.output_dir) / "seed0"
    assert not (out / "base" / "student.pt").exists()  # no base training
    saved = json.loads((out / "base" / "metrics.json").read_text())
    assert "train/acc" not in saved and "test/acc_worst_group" in saved
    assert record["base"]["test/acc"] == pytest.approx(saved["test/acc"])
    assert (out / "cd" / "student.pt").is_file()
    # the CD stage started from the given base model (one Adam step of lr 1e-3 from its mark)
    cd = torch.load(out / "cd" / "student.pt", weights_only=True)
    assert torch.allclose(cd["fc2.bias"], torch.full((10,), 5.0), atol=0.01)


def test_base_ckpt_takes_a_seed_placeholder(make_cfg: MakeCfg, tmp_path: Path) -> None:
    for seed in (0, 1):
        target = tmp_path / f"seed{seed}" / "base" / "student.pt"
        target.parent.mkdir(parents=True)
        torch.save(create_student("mnist_cnn").state_dict(), target)
    quoted = f"pipeline.base_ckpt='{tmp_path}/seed{{seed}}/base'"  # Hydra reads an unquoted { as a dict
    assert run_pipeline(make_cfg(*CD, "pipeline.seeds=[0,1]", quoted, "pipeline.dry_run=true")) == []
    assert run_pipeline(make_cfg(*CD, "pipeline.seeds=[0,1]", f"pipeline.base_ckpt={tmp_path}", "pipeline.dry_run=true")) == []
    for base in (quoted, f"pipeline.base_ckpt={tmp_path}"):
        cfg = make_cfg(*CD, "pipeline.seeds=[0,1,2]", base, "pipeline.dry_run=true")
        with pytest.raises(CdistillError, match=r"seed2"):  # every seed's base model is checked up front
            run_pipeline(cfg)


@pytest.mark.parametrize("mode", ["flatten", "position"])
def test_gate_check_fits_the_cavs_the_task_fits(make_cfg: MakeCfg, mode: str) -> None:
    from cdistill.cli.train import instantiate
    from cdistill.concepts import load_spec, preprocess
    from cdistill.concepts.check import scan_layers, term_pairs

    cfg = make_cfg(*CD, f"model.concepts.cav_mode={mode}", "model.concepts.max_rows=500",
                   "model.concepts.terms=[{concept: 'color_{y}', negative: random}]")  # a pool; accuracies 0.92-0.99
    module = instantiate(cfg.model)
    dm = instantiate(cfg.data)
    dm.setup("fit")
    bank, _ = module.fit_cavs(module.concept_activations(dm))  # what training fits on this student
    kw = {"channels": dm.num_channels, "size": dm.image_size}
    sets = load_spec(cfg.model.concepts.spec, **kw)
    inputs = {k: preprocess(v, dm.normalize, **kw) for k, v in sets.items()}
    blank = preprocess(torch.zeros_like(sets["grey"][:1]), dm.normalize, **kw)
    scores = scan_layers(module.student, inputs, term_pairs(module.concepts_cfg.terms, 10), ["conv2"],
                         module.concepts_cfg.cav, blank=blank)
    assert [s.concept for s in scores] == list(bank.concepts)
    assert [s.accuracy for s in scores] == pytest.approx(bank.accuracies.tolist(), abs=1e-6)
    assert min(s.accuracy for s in scores) < 0.99  # not a trivially perfect separation
