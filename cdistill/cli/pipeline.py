"""The whole concept-distillation pipeline in one command, over several seeds.

``python pipeline.py experiment=color_mnist/cd`` (or ``cdistill-pipeline ...``), per seed:

1. train the biased base model (the experiment's student and optimizer, plain cross-entropy,
   ``pipeline.base_epochs`` epochs);
2. fine-tune it with the experiment's concept-distillation module (CAVs and prototypes are
   fitted on the base model when training starts; ``model.layer=auto`` is chosen first, from the
   base model's CAV scan, and written to ``seed<k>/layer_choice.json``);
3. test both under every model-selection protocol, and measure the bias concept's TCAV score
   (with its p-value against random CAVs) on the base and on the distilled model;
4. measure how much each relies on the bias concept, by intervention (``pipeline.reliance``;
   the ``reliance`` measure of ``cdistill-measure`` with its ``measure.reliance.*`` settings,
   :mod:`cdistill.cli.reliance_report`): bias-subspace ablation KL and accuracy drops,
   concept-only agreement, causal energy share in the bias subspace.

Before any training it runs the checks of :mod:`cdistill.cli.preflight` (data, layer, concept
spec, terms, channels; the CAV gate when a base model is given) and stops after them with
``pipeline.dry_run=true``. ``pipeline.base_ckpt=<student.pt | .ckpt | run dir>`` (``{seed}`` is
replaced by each seed) reuses a trained base model: step 1 becomes a test of it, no training.

Then it prints the summary (mean ± std over seeds), writes ``pipeline.md``, ``pipeline.csv``
and ``pipeline.json`` in the run directory (with ``reliance_spectrum.png`` and
``reliance_agreement.png``, :mod:`cdistill.cli.reliance_plots`), and logs the summary
(``<stage>/<key>``, e.g. ``cd/paper/test/acc``, and ``<stage>/<key>_std``; the plots to wandb)
to the configured loggers (the summary tables: :mod:`cdistill.cli.pipeline_report`). The report warns in plain words when the concept loss is satisfied
but bias-conflicting accuracy or the reliance measures did not move (:mod:`cdistill.cli.report_warnings`).
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from cdistill.cli.entry import hydra_entry
from cdistill.cli.loggers import log_pngs
from cdistill.cli.measure import (
    config_reliance,
    config_reliance_scan,
    measure_device,
    reliance_layer,
)
from cdistill.cli.pipeline_report import (
    ABLATION,
    CSV_FIELDS,
    FRACTION,
    NATS,
    P_VALUE,
    PERCENT,
    RELIANCE_ROWS,
    ROWS,
    SCALE,
    md_table,
    summarize,
    summary_metrics,
    write_ablation,
)
from cdistill.cli.preflight import base_checkpoint, dry_run_report, preflight, reuse_config
from cdistill.cli.reliance_layer import is_rule
from cdistill.cli.reliance_plots import reliance_figures
from cdistill.cli.report_warnings import (
    FIRST,
    TERMS,
    first_logged,
    reliance_warnings,
    stalled_warnings,
)
from cdistill.cli.tcav_report import summary, tcav_table
from cdistill.cli.train import (
    LAYER_CHOICE_FILE,
    STUDENT_FILE,
    instantiate,
    instantiate_group,
    train,
)
from cdistill.concepts.layer_choice import config_layer
from cdistill.erasure.saved import attach_erasers, saved_erasers
from cdistill.errors import CdistillError
from cdistill.models.layers import is_auto, resolve_layer
from cdistill.models.students import create_student
from cdistill.objective.config import ConceptsConfig
from cdistill.utils.datamodule import ImageData

#: The summary's names stay importable from here (:mod:`cdistill.cli.pipeline_report`).
__all__ = [
    "ABLATION",
    "BASE_KEYS",
    "CSV_FIELDS",
    "FRACTION",
    "NATS",
    "PERCENT",
    "P_VALUE",
    "RELIANCE_ROWS",
    "ROWS",
    "SCALE",
    "ablation_key",
    "base_config",
    "bias_tcav",
    "distill_config",
    "fix_auto_layer",
    "log_summary",
    "main",
    "reliance_skip",
    "run_pipeline",
    "summarize",
    "summary_metrics",
    "variant_config",
    "write_ablation",
    "write_report",
]

log = logging.getLogger(__name__)
BASE_KEYS = ("student", "optimizer", "scheduler", "num_classes", "num_bias_groups")


def base_config(cfg: DictConfig, out: Path) -> DictConfig:
    """The base run: same data, student, optimizer and trainer, plain cross-entropy."""
    base = cfg.copy()
    with open_dict(base):
        base.model = OmegaConf.create(
            {"_target_": "cdistill.tasks.classifier.ClassifierModule", "_recursive_": False}
            | {k: cfg.model[k] for k in BASE_KEYS if k in cfg.model}
        )
        base.model.student.checkpoint_path = None
        base.trainer.max_epochs = int(cfg.pipeline.base_epochs)
        base.paths.output_dir = str(out)
    return base


def distill_config(cfg: DictConfig, base_ckpt: str, out: Path) -> DictConfig:
    """The concept-distillation run, starting from the base model's weights."""
    cd = cfg.copy()
    with open_dict(cd):
        cd.model.student.checkpoint_path = base_ckpt
        cd.paths.output_dir = str(out)
    return cd


def fix_auto_layer(cfg: DictConfig, datamodule: ImageData, base_ckpt: str, out: Path) -> DictConfig:
    """``cfg`` with ``model.layer=auto`` replaced by the layer the CAV scan of the base model
    chooses (written to ``<out>/layer_choice.json``); ``cfg`` itself otherwise."""
    choice = config_layer(cfg.model, datamodule, checkpoint=base_ckpt)
    if choice is None:
        return cfg
    fixed = cfg.copy()
    with open_dict(fixed):
        fixed.model.layer = choice.layer
    for folder in (out, out / "cd"):  # the seed's, and the CD run's (where measures look)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / LAYER_CHOICE_FILE).write_text(json.dumps(choice.to_dict(), indent=2))
    return fixed



def variant_config(cfg: DictConfig, teacher: bool, prototypes: bool) -> DictConfig:
    """The experiment with the teacher on/off and the prototype form on/off (off: the logit form)."""
    var = cfg.copy()
    with open_dict(var):
        if not teacher:
            var.model.teacher = None
        var.model.form = "prototype" if prototypes else "logit"
    return var


def ablation_key(cfg: DictConfig) -> tuple[bool, bool]:
    """Which ablation cell the experiment itself is."""
    return cfg.model.get("teacher") is not None, cfg.model.form == "prototype"


def bias_tcav(model: torch.nn.Module, cfg: DictConfig, datamodule: ImageData) -> dict[str, float]:
    """TCAV of each class's bias concept (``pipeline.tcav.concept``, ``{y}`` = class) on the
    in-distribution validation images of that class, against the spec's random sets.

    Returns:
        ``tcav`` (mean score over classes), ``tcav_p`` (median Holm-corrected p-value over
        classes) and ``tcav_significant`` (fraction of classes with corrected p < 0.05).
    """
    tc = cfg.pipeline.tcav
    concepts = OmegaConf.to_container(cfg.model.concepts, resolve=True)
    assert isinstance(concepts, dict)
    scores = tcav_table(
        model, datamodule, str(cfg.model.concepts.spec), resolve_layer(model, str(tc.get("layer") or cfg.model.layer)),
        [str(tc.concept)], random=str(tc.random), target=str(tc.target),
        solver=ConceptsConfig.from_dict(concepts).cav.solver,
    )
    return summary(scores)


def _student(ckpt: str, cfg: DictConfig) -> torch.nn.Module:
    student_kw = OmegaConf.to_container(cfg.model.student, resolve=True)
    assert isinstance(student_kw, dict)  # with an erasing stage's erasers: they are part of its model
    return attach_erasers(create_student(**{**student_kw, "checkpoint_path": ckpt}), saved_erasers(Path(ckpt)))


def _tcav_of(ckpt: str, cfg: DictConfig, datamodule: ImageData) -> dict[str, float]:
    return bias_tcav(_student(ckpt, cfg), cfg, datamodule)


def reliance_skip(cfg: DictConfig) -> str | None:
    """Why the pipeline does not measure reliance (``pipeline.reliance``), or None when it does:
    switched off, no concept spec, or no class-indexed (``{y}``) bias term to measure."""
    rel = cfg.pipeline.get("reliance") or {}
    if not rel.get("enabled", False):
        return "pipeline.reliance.enabled=false"
    concepts = cfg.model.get("concepts") if "concepts" in cfg.model else None
    if concepts is None or not concepts.get("spec"):
        return "the experiment has no concept spec (model.concepts.spec)"
    if not any("{y}" in str(t.get("concept", "")) for t in concepts.get("terms") or []):
        return "model.concepts.terms has no class-indexed bias term (a concept with '{y}')"
    if not reliance_layer(cfg):
        return "no layer to measure at (measure.reliance.layer or model.layer)"
    return None


def _reliance_of(ckpt: str, cfg: DictConfig, datamodule: ImageData, stage: str, spec: str) -> tuple[dict[str, float], dict[str, Any]]:
    """The reliance measures of one model at the layer ``spec`` names (:func:`config_reliance`,
    the ``reliance`` measure's code path): flat metrics and the plots' detail (JSON-friendly)."""
    student = _student(ckpt, cfg)
    student.to(measure_device(cfg)).eval()
    layer = resolve_layer(student, str(cfg.model.layer) if is_auto(spec) else spec)  # auto: this seed's choice
    start = time.perf_counter()
    res = config_reliance(student, datamodule, cfg, layer)
    log.info("reliance of the %s model at %s: %.0f s", stage, layer, time.perf_counter() - start)
    return res.metrics, asdict(res.detail)


def write_report(rows: list[dict[str, Any]], per_seed: list[dict[str, Any]], out: Path, title: str) -> str:
    """Write ``pipeline.md`` (accuracies, TCAV and reliance in separate tables, one unit per
    row, with the plain-words warnings of :mod:`cdistill.cli.report_warnings`),
    ``pipeline.csv`` (numeric: one row per metric with its unit, mean and std in separate
    columns) and ``pipeline.json`` (every seed's metrics); return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    reliance = [r for r in rows if str(r["key"]).startswith("reliance/")]
    acc = [r for r in rows if r["unit"] == PERCENT and r not in reliance]
    tcav = [r for r in rows if r["unit"] != PERCENT and r not in reliance]
    md = [f"# {title}", "", f"Accuracy (%), mean ± std over {len(per_seed)} seed(s):", "", *md_table(acc, False)]
    if tcav:
        md += ["", "Bias TCAV (score and share: fractions in [0, 1]; p: probability), mean ± std:", "",
               *md_table(tcav, True)]
    if reliance:
        md += ["", "Reliance on the bias concept, by intervention (docs/methods.md §5), mean ± std. TCAV reads "
               "the sign of a local derivative at one layer; these measure what the output loses without the "
               "concept (ablation) and what the concept alone makes the model answer:", "", *md_table(reliance, True)]
    warnings = stalled_warnings(per_seed) + reliance_warnings(per_seed)
    for w in warnings:
        log.warning(w)
    if warnings:
        md += ["", "**Warnings**", "", *(f"- {w}" for w in warnings)]
    text = "\n".join(md) + "\n"
    (out / "pipeline.md").write_text(text)
    with (out / "pipeline.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows([{k: ("" if r[k] is None else r[k]) for k in CSV_FIELDS} for r in rows])
    (out / "pipeline.json").write_text(json.dumps(per_seed, indent=2))
    return text




def log_summary(cfg: DictConfig, rows: Sequence[Mapping[str, Any]], images: Mapping[str, Path] | None = None) -> None:
    """Log the summary (:func:`summary_metrics`) to the configured loggers, e.g. wandb for a
    sweep over pipeline runs, and ``images`` (key -> PNG) to wandb when it is one of them."""
    loggers = instantiate_group(cfg.get("logger"))
    metrics = summary_metrics(rows)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        lg.log_metrics(metrics, step=0)
    log_pngs(loggers, images or {}, step=0)
    for lg in loggers:
        lg.finalize("success")



def _base_stage(run_cfg: DictConfig, seed: int, out: Path) -> tuple[dict[str, float], Path]:
    """Step 1: ``(metrics, weights)`` of the base model, trained or (``pipeline.base_ckpt``) reused."""
    reused = base_checkpoint(run_cfg, seed)
    if reused:  # an existing base model: tested, not trained
        return train(reuse_config(base_config(run_cfg, out / "base"), reused)), Path(reused)
    # the base model's weights after its last epoch
    return train(base_config(run_cfg, out / "base")), out / "base" / STUDENT_FILE


def _cd_stage(run_cfg: DictConfig, base_ckpt: Path, out: Path) -> dict[str, float]:
    """Step 2: the concept-distillation run's metrics, with where its concept loss started."""
    cd_metrics = train(distill_config(run_cfg, str(base_ckpt), out / "cd"))
    term = next((k for k in TERMS if k in cd_metrics), None)
    first = first_logged(out / "cd", term) if term else None
    if term and first is not None:  # where the concept loss started (the warnings' yardstick)
        cd_metrics[term + FIRST] = first
    return cd_metrics


def _ablation_cells(
    run_cfg: DictConfig, base_ckpt: Path, out: Path, cd_metrics: dict[str, float]
) -> dict[str, dict[str, float]]:
    """The paper's ablation: the other three cells from the same base model (the experiment
    itself is the fourth)."""
    own = ablation_key(run_cfg)
    cells = {ABLATION[own]: cd_metrics}
    for key, name in ABLATION.items():
        if key[1] and str(run_cfg.model.layer) == "input":  # (auto is never the input)
            log.info("ablation cell %r skipped: the prototype form has no effect at layer input", name)
            continue
        if key != own:
            var = variant_config(run_cfg, *key)
            cells[name] = train(distill_config(var, str(base_ckpt), out / f"cd_{name.replace(', ', '_').replace(' ', '-')}"))
    return cells


def _add_reliance(record: dict[str, Any], run_cfg: DictConfig, datamodule: Any, ckpts: Mapping[str, Path], seed: Any) -> None:
    """Step 4: each stage's reliance measures into ``record`` (a failure is logged, not raised)."""
    try:
        spec = reliance_layer(run_cfg)
        if is_rule(spec):  # the reliance layer rule, on the base model: both stages are measured there
            base = _student(str(ckpts["base"]), run_cfg).to(measure_device(run_cfg)).eval()
            scan = config_reliance_scan(base, datamodule, run_cfg)
            record["reliance_layer"], spec = scan.to_dict(), scan.layer
        measured = {stage: _reliance_of(str(ckpt), run_cfg, datamodule, stage, spec) for stage, ckpt in ckpts.items()}
    except CdistillError as err:  # the trained models and the rest of the report stand
        log.warning("seed %s: reliance measures skipped: %s", seed, err)
    else:
        record["reliance"] = {stage: detail for stage, (_, detail) in measured.items()}
        for stage, (metrics, _) in measured.items():
            record[stage].update(metrics)


def _run_seed(cfg: DictConfig, seed: Any, root: Path, skip: str | None) -> dict[str, Any]:
    """One seed of :func:`run_pipeline`: its record ``{seed, base, cd[, ablation, reliance]}``."""
    run_cfg = cfg.copy()
    with open_dict(run_cfg):
        run_cfg.seed = int(seed)
    out = root / f"seed{seed}"
    base_metrics, base_ckpt = _base_stage(run_cfg, int(seed), out)
    datamodule = instantiate(run_cfg.data)
    # model.layer=auto: chosen once per seed on its base model, for the CD run, the ablation
    # cells and TCAV alike (cdistill/concepts/layer_choice.py).
    run_cfg = fix_auto_layer(run_cfg, datamodule, str(base_ckpt), out)
    cd_metrics = _cd_stage(run_cfg, base_ckpt, out)
    record: dict[str, Any] = {"seed": int(seed), "base": base_metrics, "cd": cd_metrics}
    if cfg.pipeline.get("ablation"):
        record["ablation"] = _ablation_cells(run_cfg, base_ckpt, out, cd_metrics)
    ckpts = {"base": base_ckpt, "cd": out / "cd" / STUDENT_FILE}
    if cfg.pipeline.tcav.enabled:
        datamodule.setup("fit")
        for stage, ckpt in ckpts.items():
            record[stage].update(_tcav_of(str(ckpt), run_cfg, datamodule))
    if skip is None:
        _add_reliance(record, run_cfg, datamodule, ckpts, seed)
    return record


def _report(cfg: DictConfig, per_seed: list[dict[str, Any]], root: Path) -> None:
    """Step 5: the summary, its files, plots and logger metrics, and the log lines."""
    protocols = list(cfg.get("protocols") or {"last": None})
    rows = summarize(per_seed, protocols)
    text = write_report(rows, per_seed, root, f"{cfg.task_name}: base vs concept distillation")
    figures = reliance_figures(per_seed, root)
    log_summary(cfg, rows, figures)
    if cfg.pipeline.get("ablation"):
        text += "\n" + write_ablation(per_seed, protocols, root, str(cfg.task_name))
    pngs = "".join(f", {p.name}" for p in figures.values())
    log.info("\n" + text + f"\nwritten to {root}/pipeline.md, pipeline.csv, pipeline.json{pngs}")


def run_pipeline(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run base -> concept distillation -> evaluation for every seed in ``pipeline.seeds``."""
    if "layer" not in cfg.model or (cfg.pipeline.tcav.enabled and not cfg.pipeline.tcav.concept):
        raise CdistillError(
            "The pipeline needs a concept-distillation experiment (with model.layer and a "
            "pipeline section), e.g. experiment=color_mnist/cd."
        )
    root = Path(cfg.paths.output_dir)
    checks = preflight(cfg)  # fail in seconds, before the base model trains
    if cfg.pipeline.get("dry_run"):
        log.info("\n" + dry_run_report(checks, root) + f"written to {root}/dry_run.txt")
        return []
    log.info("pre-flight checks passed:\n  " + "\n  ".join(checks))
    skip = reliance_skip(cfg)
    if skip is not None:
        log.info("reliance measures skipped: %s", skip)
    per_seed = [_run_seed(cfg, seed, root, skip) for seed in cfg.pipeline.seeds]
    _report(cfg, per_seed, root)
    return per_seed


main = hydra_entry(run_pipeline, "Console entry point: ``cdistill-pipeline experiment=color_mnist/cd``.")


if __name__ == "__main__":
    main()
