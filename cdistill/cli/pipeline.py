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
to the configured loggers. The report warns in plain words when the concept loss is satisfied
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

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from cdistill.cli.loggers import log_pngs
from cdistill.cli.measure import config_reliance, measure_device, reliance_layer
from cdistill.cli.preflight import base_checkpoint, dry_run_report, preflight, reuse_config
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
    CONF_DIR,
    LAYER_CHOICE_FILE,
    STUDENT_FILE,
    instantiate,
    instantiate_group,
    train,
)
from cdistill.concepts.layer_choice import config_layer
from cdistill.errors import CdistillError, exit_on_error
from cdistill.models.layers import is_auto, resolve_layer
from cdistill.models.students import create_student
from cdistill.objective.config import ConceptsConfig
from cdistill.utils.datamodule import ImageData
from cdistill.utils.formatting import format_mean_std, mean_std

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


#: The paper's ablation: (teacher on?, prototypes on?) -> column name.
ABLATION = {(True, True): "teacher, prototypes", (True, False): "teacher, no prototypes",
            (False, True): "no teacher, prototypes", (False, False): "no teacher, no prototypes"}


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
    assert isinstance(student_kw, dict)
    return create_student(**{**student_kw, "checkpoint_path": ckpt})


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


def _reliance_of(ckpt: str, cfg: DictConfig, datamodule: ImageData, stage: str) -> tuple[dict[str, float], dict[str, Any]]:
    """The reliance measures of one model (:func:`cdistill.cli.measure.config_reliance`, the
    ``reliance`` measure's code path): flat metrics and the plots' detail (JSON-friendly)."""
    student = _student(ckpt, cfg)
    student.to(measure_device(cfg)).eval()
    spec = reliance_layer(cfg)
    layer = resolve_layer(student, str(cfg.model.layer) if is_auto(spec) else spec)  # auto: this seed's choice
    start = time.perf_counter()
    res = config_reliance(student, datamodule, cfg, layer)
    log.info("reliance of the %s model at %s: %.0f s", stage, layer, time.perf_counter() - start)
    return res.metrics, asdict(res.detail)


ROWS = [
    ("test/acc", "test acc"),
    ("test/acc_aligned", "test acc, bias-aligned"),
    ("test/acc_conflicting", "test acc, bias-conflicting"),
    ("test/acc_worst_group", "test acc, worst (label, bias) group"),
    ("test/acc_group_mean", "test acc, mean over (label, bias) groups"),
]
#: Units of the summary: accuracies in percent; TCAV scores and shares as fractions in [0, 1];
#: p-values as probabilities (printed in scientific notation); KL divergences in nats.
PERCENT, FRACTION, P_VALUE, NATS = "%", "fraction", "p-value", "nats"
SCALE = {PERCENT: 100.0, FRACTION: 1.0, P_VALUE: 1.0, NATS: 1.0}
#: The reliance table (``reliance/*`` keys of :mod:`cdistill.cli.reliance_report`).
RELIANCE_ROWS = [
    ("reliance/concept_agreement", "concept-only agreement (concept images -> their class)", FRACTION),
    ("reliance/chance", "concept-only agreement at chance", FRACTION),
    ("reliance/ablation_kl", "bias-subspace ablation KL", NATS),
    ("reliance/ablation_kl_random", "random-subspace ablation KL (control, same rank)", NATS),
    ("reliance/acc_drop", "acc drop, bias subspace ablated (points)", PERCENT),
    ("reliance/acc_drop_conflicting", "acc drop, bias subspace ablated, bias-conflicting (points)", PERCENT),
    ("reliance/acc_drop_aligned", "acc drop, bias subspace ablated, bias-aligned (points)", PERCENT),
    ("reliance/causal_share_in_bias", "causal energy share in the bias subspace", FRACTION),
]
CSV_FIELDS = ["metric", "key", "unit", "n_seeds", "base_mean", "base_std", "cd_mean", "cd_std"]


def _stats(vals: Sequence[float], scale: float) -> tuple[float | None, float | None]:
    """``(mean, std)`` over seeds in the row's unit (sample std; 0.0 for one seed)."""
    if not vals:
        return None, None
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return scale * float(np.mean(vals)), scale * std


def _row(per_seed: Sequence[Mapping[str, Mapping[str, float]]], label: str, key: str, unit: str,
         stages: Sequence[str] = ("base", "cd")) -> dict[str, Any]:
    """One summary row: ``metric`` (label), ``key`` (of the per-seed metrics), ``unit``,
    ``n_seeds`` and ``<stage>_mean``/``<stage>_std`` in that unit (None where not measured)."""
    row: dict[str, Any] = {"metric": label, "key": key, "unit": unit, "n_seeds": len(per_seed)}
    for stage in ("base", "cd"):
        vals = [r[stage][key] for r in per_seed if key in r[stage]] if stage in stages else []
        row[f"{stage}_mean"], row[f"{stage}_std"] = _stats(vals, SCALE[unit])
    return row


def _measured(row: Mapping[str, Any]) -> bool:
    return row["base_mean"] is not None or row["cd_mean"] is not None


def summarize(per_seed: Sequence[Mapping[str, Mapping[str, float]]], protocols: Sequence[str]) -> list[dict[str, Any]]:
    """Summary rows (see :func:`_row`): numbers, mean and std apart, one unit per row."""
    rows = [_row(per_seed, f"{label} ({proto} selection)", f"{proto}/{key}", PERCENT)
            for proto in protocols for key, label in ROWS]
    # Erasure runs: a fresh linear probe for the bias at the erased layer (val split).
    probes = (("test/bias_probe_acc", "bias probe acc, erasers on"),
              ("test/bias_probe_acc_unerased", "bias probe acc, erasers off"),
              ("test/bias_probe_chance", "bias probe chance (majority rate)"))
    for key, label in probes:
        if any(f"{protocols[0]}/{key}" in r["cd"] for r in per_seed):
            rows += [_row(per_seed, f"{label} ({proto} selection)", f"{proto}/{key}", PERCENT, ("cd",))
                     for proto in protocols]
    rows.append(_row(per_seed, "val acc (in-distribution, last epoch)", "val/acc", PERCENT))
    if any("tcav" in r["base"] for r in per_seed):
        rows.append(_row(per_seed, "bias TCAV score", "tcav", FRACTION))
        rows.append(_row(per_seed, "bias TCAV p (Holm, median)", "tcav_p", P_VALUE))
        rows.append(_row(per_seed, "bias TCAV significant (share of classes, p < 0.05)", "tcav_significant", FRACTION))
    rows += [_row(per_seed, label, key, unit) for key, label, unit in RELIANCE_ROWS]
    # e.g. no bias-aligned test images on the MNIST benchmarks
    return [r for r in rows if _measured(r)]


def _cell(mean: float | None, std: float | None, unit: str) -> str:
    """``mean ± std`` for the markdown table; p-values and KL divergences (which span orders of
    magnitude, 1e-4 for a control to 4 nats) in scientific notation."""
    return format_mean_std(mean, std, sci=unit in (P_VALUE, NATS))


def _md_table(rows: Sequence[Mapping[str, Any]], with_unit: bool) -> list[str]:
    head = "| metric |" + (" unit |" if with_unit else "") + " base | concept-distilled |"
    md = [head, "|---" * (4 if with_unit else 3) + "|"]
    for r in rows:
        unit = f" {r['unit']} |" if with_unit else ""
        md.append(f"| {r['metric']} |{unit} {_cell(r['base_mean'], r['base_std'], r['unit'])} | "
                  f"{_cell(r['cd_mean'], r['cd_std'], r['unit'])} |")
    return md


def write_report(rows: list[dict[str, Any]], per_seed: list[dict[str, Any]], out: Path, title: str) -> str:
    """Write ``pipeline.md`` (accuracies, TCAV and reliance in separate tables, one unit per
    row, with the plain-words warnings of :mod:`cdistill.cli.report_warnings`),
    ``pipeline.csv`` (numeric: one row per metric with its unit, mean and std in separate
    columns) and ``pipeline.json`` (every seed's metrics); return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    reliance = [r for r in rows if str(r["key"]).startswith("reliance/")]
    acc = [r for r in rows if r["unit"] == PERCENT and r not in reliance]
    tcav = [r for r in rows if r["unit"] != PERCENT and r not in reliance]
    md = [f"# {title}", "", f"Accuracy (%), mean ± std over {len(per_seed)} seed(s):", "", *_md_table(acc, False)]
    if tcav:
        md += ["", "Bias TCAV (score and share: fractions in [0, 1]; p: probability), mean ± std:", "",
               *_md_table(tcav, True)]
    if reliance:
        md += ["", "Reliance on the bias concept, by intervention (docs/methods.md §5), mean ± std. TCAV reads "
               "the sign of a local derivative at one layer; these measure what the output loses without the "
               "concept (ablation) and what the concept alone makes the model answer:", "", *_md_table(reliance, True)]
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


def summary_metrics(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The summary as logger metrics in the per-run scale (fractions, as in ``metrics.json``):
    ``<stage>/<key>`` (mean over seeds, e.g. ``cd/paper/test/acc``, the CD sweep's objective)
    and ``<stage>/<key>_std``."""
    out: dict[str, float] = {}
    for r in rows:
        scale = SCALE[r["unit"]]
        for stage in ("base", "cd"):
            if r[f"{stage}_mean"] is not None:
                out[f"{stage}/{r['key']}"] = r[f"{stage}_mean"] / scale
                out[f"{stage}/{r['key']}_std"] = r[f"{stage}_std"] / scale
    return out


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


def write_ablation(per_seed: Sequence[Mapping[str, Any]], protocols: Sequence[str], out: Path, task: str) -> str:
    """The paper's ablation (teacher on/off x prototypes on/off) as ``pipeline_ablation.md``.

    Rows: the four variants and the base model; columns: reversed-bias test accuracy per
    protocol, and the mean held-out accuracy of the CAVs the loss used (student or mapped
    teacher space).
    """
    head = [f"test acc ({p})" for p in protocols] + ["CAV acc (student space)", "CAV acc (teacher space)"]
    md = [f"# {task}: teacher x prototypes ablation", "", "| variant | " + " | ".join(head) + " |",
          "|---" * (len(head) + 1) + "|"]
    base = [mean_std([r["base"][f"{p}/test/acc"] for r in per_seed if f"{p}/test/acc" in r["base"]], scale=100.0) for p in protocols]
    md.append("| base model | " + " | ".join([*base, "-", "-"]) + " |")
    for name in ABLATION.values():
        runs = [r["ablation"][name] for r in per_seed if name in r.get("ablation", {})]
        cells = [mean_std([m[f"{p}/test/acc"] for m in runs if f"{p}/test/acc" in m], scale=100.0) for p in protocols]
        cells += [mean_std([m[k] for m in runs if k in m]).replace(" ± ", "±") for k in ("cav/acc_student", "cav/acc_teacher")]
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    md += ["", f"Reversed-bias test accuracy %, mean ± std over {len(per_seed)} seed(s), every variant "
           "fine-tuned from the same base model per seed. No prototypes = the logit form. '-': not run "
           "(the prototype form cannot act at layer `input`, which depends on no parameter)."]
    text = "\n".join(md) + "\n"
    (out / "pipeline_ablation.md").write_text(text)
    return text


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
    per_seed: list[dict[str, Any]] = []
    for seed in cfg.pipeline.seeds:
        run_cfg = cfg.copy()
        with open_dict(run_cfg):
            run_cfg.seed = int(seed)
        out = root / f"seed{seed}"
        reused = base_checkpoint(run_cfg, int(seed))
        if reused:  # an existing base model: tested, not trained
            base_metrics = train(reuse_config(base_config(run_cfg, out / "base"), reused))
            base_ckpt = Path(reused)
        else:
            base_metrics = train(base_config(run_cfg, out / "base"))
            base_ckpt = out / "base" / STUDENT_FILE  # the base model's weights after its last epoch
        datamodule = instantiate(run_cfg.data)
        # model.layer=auto: chosen once per seed on its base model, for the CD run, the ablation
        # cells and TCAV alike (cdistill/concepts/layer_choice.py).
        run_cfg = fix_auto_layer(run_cfg, datamodule, str(base_ckpt), out)
        cd_metrics = train(distill_config(run_cfg, str(base_ckpt), out / "cd"))
        term = next((k for k in TERMS if k in cd_metrics), None)
        first = first_logged(out / "cd", term) if term else None
        if term and first is not None:  # where the concept loss started (the warnings' yardstick)
            cd_metrics[term + FIRST] = first
        record: dict[str, Any] = {"seed": int(seed), "base": base_metrics, "cd": cd_metrics}
        if cfg.pipeline.get("ablation"):
            # The other three cells from the same base model (the experiment itself is the fourth).
            own = ablation_key(run_cfg)
            record["ablation"] = {ABLATION[own]: cd_metrics}
            for key, name in ABLATION.items():
                if key[1] and str(run_cfg.model.layer) == "input":  # (auto is never the input)
                    log.info("ablation cell %r skipped: the prototype form has no effect at layer input", name)
                    continue
                if key != own:
                    var = variant_config(run_cfg, *key)
                    record["ablation"][name] = train(distill_config(var, str(base_ckpt), out / f"cd_{name.replace(', ', '_').replace(' ', '-')}"))
        if cfg.pipeline.tcav.enabled:
            datamodule.setup("fit")
            record["base"].update(_tcav_of(str(base_ckpt), run_cfg, datamodule))
            cd_ckpt = out / "cd" / STUDENT_FILE
            record["cd"].update(_tcav_of(str(cd_ckpt), run_cfg, datamodule))
        if skip is None:
            try:
                measured = {stage: _reliance_of(str(ckpt), run_cfg, datamodule, stage)
                            for stage, ckpt in (("base", base_ckpt), ("cd", out / "cd" / STUDENT_FILE))}
            except CdistillError as err:  # the trained models and the rest of the report stand
                log.warning("seed %s: reliance measures skipped: %s", seed, err)
            else:
                record["reliance"] = {stage: detail for stage, (_, detail) in measured.items()}
                for stage, (metrics, _) in measured.items():
                    record[stage].update(metrics)
        per_seed.append(record)
    protocols = list(cfg.get("protocols") or {"last": None})
    rows = summarize(per_seed, protocols)
    text = write_report(rows, per_seed, root, f"{cfg.task_name}: base vs concept distillation")
    figures = reliance_figures(per_seed, root)
    log_summary(cfg, rows, figures)
    if cfg.pipeline.get("ablation"):
        text += "\n" + write_ablation(per_seed, protocols, root, str(cfg.task_name))
    pngs = "".join(f", {p.name}" for p in figures.values())
    log.info("\n" + text + f"\nwritten to {root}/pipeline.md, pipeline.csv, pipeline.json{pngs}")
    return per_seed


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@exit_on_error
def main(cfg: DictConfig) -> None:
    """Console entry point: ``cdistill-pipeline experiment=color_mnist/cd``."""
    run_pipeline(cfg)


if __name__ == "__main__":
    main()
