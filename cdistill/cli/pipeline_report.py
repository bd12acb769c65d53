"""The summary tables of :mod:`cdistill.cli.pipeline`: mean ± std over seeds, one unit per row.

:func:`summarize` turns every seed's metrics into rows (accuracies per model-selection protocol,
bias probes, TCAV, reliance); :func:`summary_metrics` gives them to the loggers; :func:`md_table`
renders them for ``pipeline.md``; :func:`write_ablation` writes the paper's teacher x prototypes
ablation (``pipeline_ablation.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cdistill.utils.formatting import format_mean_std, mean_std

#: The paper's ablation: (teacher on?, prototypes on?) -> column name.
ABLATION = {(True, True): "teacher, prototypes", (True, False): "teacher, no prototypes",
            (False, True): "no teacher, prototypes", (False, False): "no teacher, no prototypes"}

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


def md_table(rows: Sequence[Mapping[str, Any]], with_unit: bool) -> list[str]:
    """Markdown table of summary rows: metric, (unit,) base and concept-distilled ``mean ± std``."""
    head = "| metric |" + (" unit |" if with_unit else "") + " base | concept-distilled |"
    md = [head, "|---" * (4 if with_unit else 3) + "|"]
    for r in rows:
        unit = f" {r['unit']} |" if with_unit else ""
        md.append(f"| {r['metric']} |{unit} {_cell(r['base_mean'], r['base_std'], r['unit'])} | "
                  f"{_cell(r['cd_mean'], r['cd_std'], r['unit'])} |")
    return md


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
