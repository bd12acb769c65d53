"""The whole concept-distillation pipeline in one command, over several seeds.

``python pipeline.py experiment=color_mnist/cd`` (or ``cdistill-pipeline ...``), per seed:

1. train the biased base model (the experiment's student and optimizer, plain cross-entropy,
   ``pipeline.base_epochs`` epochs);
2. fine-tune it with the experiment's concept-distillation module (CAVs and prototypes are
   fitted on the base model when training starts; ``model.layer=auto`` is chosen first, from the
   base model's CAV scan, and written to ``seed<k>/layer_choice.json``);
3. test both under every model-selection protocol, and measure the bias concept's TCAV score
   (with its p-value against random CAVs) on the base and on the distilled model.

Before any training it runs the checks of :mod:`cdistill.cli.preflight` (data, layer, concept
spec, terms, channels; the CAV gate when a base model is given) and stops after them with
``pipeline.dry_run=true``. ``pipeline.base_ckpt=<student.pt | .ckpt | run dir>`` (``{seed}`` is
replaced by each seed) reuses a trained base model: step 1 becomes a test of it, no training.

Then it prints the summary (mean ± std over seeds), writes ``pipeline.md``, ``pipeline.csv``
and ``pipeline.json`` in the run directory, and logs the summary (``<stage>/<key>``, e.g.
``cd/paper/test/acc``, and ``<stage>/<key>_std``) to the configured loggers.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from cdistill.cli.preflight import base_checkpoint, dry_run_report, preflight, reuse_config
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
from cdistill.models.layers import resolve_layer
from cdistill.models.students import create_student
from cdistill.objective.config import ConceptsConfig
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


def fix_auto_layer(cfg: DictConfig, datamodule: Any, base_ckpt: str, out: Path) -> DictConfig:
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


def bias_tcav(model: torch.nn.Module, cfg: DictConfig, datamodule: Any) -> dict[str, float]:
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


def _tcav_of(ckpt: str, cfg: DictConfig, datamodule: Any) -> dict[str, float]:
    student_kw = OmegaConf.to_container(cfg.model.student, resolve=True)
    assert isinstance(student_kw, dict)
    student = create_student(**{**student_kw, "checkpoint_path": ckpt})
    return bias_tcav(student, cfg, datamodule)


ROWS = [
    ("test/acc", "test acc"),
    ("test/acc_aligned", "test acc, bias-aligned"),
    ("test/acc_conflicting", "test acc, bias-conflicting"),
    ("test/acc_worst_group", "test acc, worst (label, bias) group"),
    ("test/acc_group_mean", "test acc, mean over (label, bias) groups"),
]
#: Units of the summary: accuracies in percent; TCAV scores and shares as fractions in [0, 1];
#: p-values as probabilities (printed in scientific notation).
PERCENT, FRACTION, P_VALUE = "%", "fraction", "p-value"
SCALE = {PERCENT: 100.0, FRACTION: 1.0, P_VALUE: 1.0}
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
    # e.g. no bias-aligned test images on the MNIST benchmarks
    return [r for r in rows if _measured(r)]


def _cell(mean: float | None, std: float | None, unit: str) -> str:
    """``mean ± std`` for the markdown table; p-values in scientific notation."""
    return format_mean_std(mean, std, sci=unit == P_VALUE)


def _md_table(rows: Sequence[Mapping[str, Any]], with_unit: bool) -> list[str]:
    head = "| metric |" + (" unit |" if with_unit else "") + " base | concept-distilled |"
    md = [head, "|---" * (4 if with_unit else 3) + "|"]
    for r in rows:
        unit = f" {r['unit']} |" if with_unit else ""
        md.append(f"| {r['metric']} |{unit} {_cell(r['base_mean'], r['base_std'], r['unit'])} | "
                  f"{_cell(r['cd_mean'], r['cd_std'], r['unit'])} |")
    return md


#: A concept term under this value counts as satisfied (the logged last-epoch mean).
SATISFIED = 0.05
#: Bias-conflicting validation accuracy must rise by at least this much (a fraction) to count as moved.
MOVED = 0.02
#: The concept terms the warning looks at, in order: gradient direction, concept-only outputs,
#: RR-ClArC, the student's side of the adversarial probe (a fooled probe is not a removed cue).
TERMS = ("train/concept", "train/output", "train/rrclarc", "train/probe")


def _conflicting(metrics: Mapping[str, float]) -> float | None:
    for key in ("val_reversed/acc_conflicting", "val_reversed/acc", "val/acc_conflicting"):
        if key in metrics:
            return float(metrics[key])
    return None


def stalled_warnings(per_seed: Sequence[Mapping[str, Any]]) -> list[str]:
    """One warning per seed whose concept term is satisfied (the first of :data:`TERMS` logged,
    under :data:`SATISFIED`) while bias-conflicting validation accuracy (last epoch) rose by less
    than :data:`MOVED` over the base model's: a loss near 0 is not debiasing."""
    out = []
    for r in per_seed:
        base, cd = r.get("base", {}), r.get("cd", {})
        term = next((k for k in TERMS if k in cd), None)
        before, after = _conflicting(base), _conflicting(cd)
        if term is None or before is None or after is None:
            continue
        if float(cd[term]) < SATISFIED and after - before < MOVED:
            out.append(f"seed {r.get('seed')}: {term} = {float(cd[term]):.4f} (satisfied) but bias-conflicting "
                       f"validation accuracy moved {100 * before:.1f}% -> {100 * after:.1f}%: the model may read "
                       "the cue in a way the concept term does not see (docs/methods.md §2.8).")
    return out


def write_report(rows: list[dict[str, Any]], per_seed: list[dict[str, Any]], out: Path, title: str) -> str:
    """Write ``pipeline.md`` (accuracies and TCAV in separate tables, one unit each),
    ``pipeline.csv`` (numeric: one row per metric with its unit, mean and std in separate
    columns) and ``pipeline.json`` (every seed's metrics); return the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    acc = [r for r in rows if r["unit"] == PERCENT]
    tcav = [r for r in rows if r["unit"] != PERCENT]
    md = [f"# {title}", "", f"Accuracy (%), mean ± std over {len(per_seed)} seed(s):", "", *_md_table(acc, False)]
    if tcav:
        md += ["", "Bias TCAV (score and share: fractions in [0, 1]; p: probability), mean ± std:", "",
               *_md_table(tcav, True)]
    warnings = stalled_warnings(per_seed)
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


def log_summary(cfg: DictConfig, rows: Sequence[Mapping[str, Any]]) -> None:
    """Log the summary (:func:`summary_metrics`) to the configured loggers, e.g. wandb for a
    sweep over pipeline runs."""
    loggers = instantiate_group(cfg.get("logger"))
    metrics = summary_metrics(rows)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        lg.log_metrics(metrics, step=0)
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
        per_seed.append(record)
    protocols = list(cfg.get("protocols") or {"last": None})
    rows = summarize(per_seed, protocols)
    text = write_report(rows, per_seed, root, f"{cfg.task_name}: base vs concept distillation")
    log_summary(cfg, rows)
    if cfg.pipeline.get("ablation"):
        text += "\n" + write_ablation(per_seed, protocols, root, str(cfg.task_name))
    log.info("\n" + text + f"\nwritten to {root}/pipeline.md, pipeline.csv, pipeline.json")
    return per_seed


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
@exit_on_error
def main(cfg: DictConfig) -> None:
    """Console entry point: ``cdistill-pipeline experiment=color_mnist/cd``."""
    run_pipeline(cfg)


if __name__ == "__main__":
    main()
