"""The pipeline report's reliance part: the plain-words warning rule (both directions), the
concept loss's first logged value, the reliance table, the plots and their way to wandb, and
when the pipeline skips the measures. The pipeline run itself: tests/cli/test_train.py
(test_pipeline_writes_report) and tests/cli/test_preflight.py (the switch off)."""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from omegaconf import DictConfig

from cdistill.causal import Agreement, wilson_interval
from cdistill.cli.loggers import log_pngs
from cdistill.cli.pipeline import reliance_skip, summarize, write_report
from cdistill.cli.reliance_plots import plot_agreement, plot_spectrum, reliance_figures
from cdistill.cli.reliance_report import RelianceDetail
from cdistill.cli.report_warnings import (
    SATISFIED,
    SATISFIED_SHARE,
    concept_satisfied,
    first_logged,
    reliance_unmoved,
    reliance_warnings,
)

MakeCfg = Callable[..., DictConfig]
PHRASE = "a satisfied concept loss is not evidence of debiasing"


def _reliance(agreement: float, kl: float, n: int = 1000, chance: float = 0.1) -> dict[str, float]:
    lo, hi = wilson_interval(round(agreement * n), n)
    return {"reliance/concept_agreement": agreement, "reliance/concept_agreement_lo": lo,
            "reliance/concept_agreement_hi": hi, "reliance/chance": chance, "reliance/ablation_kl": kl}


BASE = _reliance(0.92, 3.9)


def _seed(seed: int, cd: dict[str, float], loss: float = 0.004, first: float | None = 0.4) -> dict[str, Any]:
    term = {"train/output": loss} | ({"train/output_first": first} if first is not None else {})
    return {"seed": seed, "base": dict(BASE), "cd": term | cd}


def test_concept_satisfied_is_near_zero_or_a_tenth_of_its_start() -> None:
    assert concept_satisfied(None, SATISFIED / 2) and not concept_satisfied(None, 2 * SATISFIED)
    assert concept_satisfied(4.0, 4.0 * SATISFIED_SHARE)  # fell by 90%, though far from 0 in absolute terms
    assert not concept_satisfied(4.0, 4.0 * SATISFIED_SHARE * 1.5)
    assert concept_satisfied(0.01, 0.01)  # started near zero: satisfied from the first step


def test_warns_when_the_loss_is_satisfied_and_reliance_did_not_move() -> None:
    stuck = _seed(1, _reliance(0.88, 3.1))  # agreement barely down, KL down 21% only
    (warning,) = reliance_warnings([stuck])
    assert warning.startswith("seed 1: the concept loss is satisfied (train/output 0.4000 -> 0.0040)")
    assert "still relies on the concept" in warning and PHRASE in warning
    assert "concept-only agreement 0.92 -> 0.88" in warning and "ablation KL 3.9 -> 3.1" in warning


def test_no_warning_when_reliance_moved_or_the_loss_is_not_satisfied() -> None:
    debiased = _seed(1, _reliance(0.11, 0.076))  # the default recipe on ColorMNIST seed 1
    unsatisfied = _seed(2, _reliance(0.88, 3.1), loss=0.3, first=0.4)
    kl_moved = _seed(3, _reliance(0.88, 2.0))  # KL down 49%: one measure moved, the case is not clear-cut
    at_chance = _seed(4, _reliance(0.12, 3.5), first=None)  # agreement's CI reaches chance
    assert reliance_warnings([debiased, unsatisfied, kl_moved, at_chance]) == []
    assert reliance_unmoved(BASE, {}) == []  # nothing measured after: nothing to say


def test_the_unmoved_rule_reads_each_measure_against_its_own_floor() -> None:
    # a third of the way to chance (0.92 -> 0.647) is "moved"; a bit less is not
    assert reliance_unmoved({"reliance/concept_agreement": 0.92}, _reliance(0.70, 0.0) | {"reliance/ablation_kl": 0.0})
    agree_only = {k: v for k, v in _reliance(0.60, 0.0).items() if k != "reliance/ablation_kl"}
    assert reliance_unmoved({"reliance/concept_agreement": 0.92}, agree_only) == []
    assert reliance_unmoved({"reliance/ablation_kl": 3.0}, {"reliance/ablation_kl": 2.1})  # down 30%
    assert reliance_unmoved({"reliance/ablation_kl": 3.0}, {"reliance/ablation_kl": 1.9}) == []  # down 37%


def test_first_logged_reads_the_csv_logger(tmp_path: Path) -> None:
    path = tmp_path / "csv" / "version_0" / "metrics.csv"
    path.parent.mkdir(parents=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "train/output_step", "train/output_epoch"])
        writer.writeheader()
        writer.writerows([{"step": 0, "train/output_step": "", "train/output_epoch": ""},
                          {"step": 9, "train/output_step": 0.42, "train/output_epoch": ""},
                          {"step": 19, "train/output_step": 0.01, "train/output_epoch": 0.2}])
    assert first_logged(tmp_path, "train/output") == pytest.approx(0.42)
    assert first_logged(tmp_path, "train/concept") is None
    assert first_logged(tmp_path / "nothing", "train/output") is None


def _detail(rate: float, energies: list[float]) -> RelianceDetail:
    hits = round(rate * 50)
    parts = [Agreement(hits / 50, *wilson_interval(hits, 50), 1 / 3, 50, hits) for _ in range(3)]
    return RelianceDetail([f"color_{k}" for k in range(3)], [0, 1, 2], parts, energies, [0.7] * len(energies))


def test_plots_and_their_way_to_wandb(tmp_path: Path) -> None:
    before, after = _detail(0.9, [3.9, 0.5, 0.1]), _detail(0.3, [0.08, 0.0, 0.0])
    panels = [("seed 1", {"base": before, "concept-distilled": after})]
    assert plot_agreement(panels, tmp_path / "a.png").stat().st_size > 1000
    assert plot_spectrum(panels, tmp_path / "s.png").stat().st_size > 1000  # zero energies on a log axis
    assert plot_spectrum([("seed 1", {"base": _detail(0.9, [])})], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    record = {"seed": 1, "reliance": {"base": asdict(before), "cd": asdict(after)}}  # as in pipeline.json
    figures = reliance_figures([record, {"seed": 2, "base": {}, "cd": {}}], tmp_path / "run")
    assert set(figures) == {"reliance_agreement", "reliance_spectrum"} and all(p.is_file() for p in figures.values())

    class WandbLogger:  # a stand-in: log_pngs picks wandb loggers by class name
        def __init__(self) -> None:
            self.calls: list[tuple[str, list[str], int]] = []

        def log_image(self, key: str, images: list[str], step: int) -> None:
            self.calls.append((key, images, step))

    class CSVLogger:  # takes no images
        pass

    wandb = WandbLogger()
    log_pngs([CSVLogger(), wandb], figures, step=0)
    assert sorted(c[0] for c in wandb.calls) == ["reliance_agreement", "reliance_spectrum"]
    assert all(Path(c[1][0]).is_file() and c[2] == 0 for c in wandb.calls)


def test_report_shows_reliance_before_and_after_and_the_warning(tmp_path: Path) -> None:
    seeds = [_seed(1, _reliance(0.88, 3.1)), _seed(2, _reliance(0.86, 3.3))]
    rows = summarize(seeds, ["strict"])
    text = write_report(rows, seeds, tmp_path, "t")
    (kl,) = [ln for ln in text.splitlines() if ln.startswith("| bias-subspace ablation KL |")]
    assert kl == "| bias-subspace ablation KL | nats | 3.90e+00 ± 0.00e+00 | 3.20e+00 ± 1.41e-01 |"
    (agree,) = [ln for ln in text.splitlines() if ln.startswith("| concept-only agreement (")]
    assert "0.92 ± 0.00 | 0.87 ± 0.01 |" in agree
    assert text.count(PHRASE) == 2 and "**Warnings**" in text


def test_reliance_is_skipped_without_a_class_indexed_term_or_spec(make_cfg: MakeCfg) -> None:
    cd = ("experiment=color_mnist/cd",)
    assert reliance_skip(make_cfg(*cd)) is None
    assert reliance_skip(make_cfg(*cd, "pipeline.reliance.enabled=false")) == "pipeline.reliance.enabled=false"
    no_term = reliance_skip(make_cfg(*cd, "model.concepts.terms=[{concept: grey, negative: random}]"))
    assert no_term is not None and "{y}" in no_term
    assert "no concept spec" in str(reliance_skip(make_cfg("experiment=color_mnist/baseline")))


def test_pipeline_scans_the_base_model_and_measures_both_stages_there(make_cfg: MakeCfg, tmp_path: Path) -> None:
    import torch

    from cdistill.cli.pipeline import _add_reliance
    from cdistill.cli.train import instantiate
    from cdistill.models.students import create_student

    ckpts = {}
    for seed, stage in ((1, "base"), (2, "cd")):
        torch.manual_seed(seed)
        ckpts[stage] = tmp_path / stage / "student.pt"
        ckpts[stage].parent.mkdir()
        torch.save(create_student("mnist_cnn").state_dict(), ckpts[stage])
    cfg = make_cfg("experiment=color_mnist/cd", "measure.reliance.layer=reliance", "measure.reliance.max_inputs=64",
                   "measure.reliance.k=0", "measure.reliance.concept_images=20")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    record: dict[str, Any] = {"base": {}, "cd": {}}
    _add_reliance(record, cfg, datamodule, ckpts, 0)
    scan = record["reliance_layer"]
    chosen = next(s for s in scan["scores"] if s["layer"] == scan["layer"])
    # The base model's ablation at the chosen layer is the scan's own (same CAVs, inputs and control).
    assert record["base"]["reliance/ablation_kl"] == pytest.approx(chosen["ablation_kl"], rel=1e-6)
    assert record["base"]["reliance/ablation_kl_random"] == pytest.approx(chosen["control_kl"], rel=1e-6)
    assert "reliance/ablation_kl" in record["cd"] and set(record["reliance"]) == {"base", "cd"}
