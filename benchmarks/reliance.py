"""Do the reliance measures agree with accuracy? (issue: know whether a model relies on a concept)

    python benchmarks/reliance.py --runs logs/generality logs/rel --layer-rule reliance --out pairs.jsonl
    python benchmarks/reliance.py --table benchmarks/results/reliance_pairs_reliance_layer.jsonl

Every pipeline run under ``--runs`` (``<family>/<name>_seed<k>/``, as ``benchmarks/generality.py``
writes them) is one pair: the biased base model and the model fine-tuned (or erased) from it.
Both are measured from the checkpoint strict selection chose (``selection.json``) with
``cdistill-measure measure.measures=[accuracy,tcav,reliance]``, under the experiment and
overrides of the run that trained the base model (so every pair on one base model measures the
bias concept the same way), at one layer per base model, chosen on the base model alone:

- ``--layer-rule reliance`` (default): the reliance layer rule (``measure.reliance.layer=reliance``,
  :mod:`cdistill.cli.reliance_layer`): the candidate layer where mean-ablating the bias CAVs'
  span moves the base model's output most, net of a random span of the same rank; the scan is
  cached in ``<base stage>/reliance_layer/reliance_layer.json``;
- ``--layer-rule auto``: the layer ``model.layer=auto`` chose on it (the default recipe's
  ``layer_choice.json`` of the same family and seed).

``benchmarks/compare.py``'s concept and erasure cells are pairs too (``--runs <compare runs>
--names leace rlace``): their base model is the ERM cell, measured under ``<family>/cd``. An
erasing run's model is measured with its erasers (they are in its checkpoint).
``--subspace leace`` ablates the subspace a LEACE eraser of the bias edits instead of the bias
CAVs' span (``measure.reliance.subspace=leace``), at the same layer.

Each measurement is cached in ``<stage dir>/measure_<layer>/measure.json`` (in
``measure_<layer>_<experiment>`` when that folder was measured under another experiment).

Per pair, each measure's *drop* ``m0 - m1`` (before minus after; concept-only agreement,
concept-ablation KL, causal share in the bias subspace, and TCAV of the bias concept), and the
*gain*: bias-conflicting test accuracy after minus before (points). The agreement's primary drop
is scaled by the room above chance, ``(a0 - a1) / (1 - chance)`` (tasks differ in chance level:
0.1 on the MNIST families, 0.5 on faces); the absolute drop is kept beside it. The table gives
each drop's Spearman ρ with the gain over all pairs (TCAV beside them), and the pairs. The drop
relative to what there was to lose (``(a0 - a1) / (a0 - chance)`` for the agreement,
``(m0 - m1) / m0`` for the others) is reported as well; it is undefined where the base model
does not rely on the concept (agreement at chance, KL ~0).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's cdistill
from cdistill.utils.formatting import mean_std

ROOT = Path(__file__).resolve().parents[1]
MEASURES = "[accuracy,tcav,reliance]"
#: (column, metric key, how its drop is computed)
DROPS = (
    ("agreement", "reliance/concept_agreement", "to_chance"),
    ("ablation_kl", "reliance/ablation_kl", "relative"),
    ("causal_share", "reliance/causal_share_in_bias", "relative"),
    ("tcav", "tcav", "relative"),
)
#: Rows of the ρ table: (measure, which drop, row key of the drop, row key of its relative drop).
RHO_ROWS = (
    ("agreement", "chance-scaled (primary)", "agreement_scaled_drop", "agreement_rel_drop"),
    ("agreement", "absolute", "agreement_drop", None),
    ("ablation_kl", "absolute (primary)", "ablation_kl_drop", "ablation_kl_rel_drop"),
    ("causal_share", "absolute (primary)", "causal_share_drop", "causal_share_rel_drop"),
    ("tcav (for comparison)", "absolute", "tcav_drop", "tcav_rel_drop"),
)
RULES = ("reliance", "auto")
SUBSPACES = ("cavs", "leace")


def _overrides(run: Path) -> list[str]:
    """The run's experiment and model/data overrides (not the pipeline's or Hydra's own)."""
    lines = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    return [o for o in lines if not o.startswith(("pipeline.", "hydra."))]


def _measure_overrides(base: Path) -> list[str]:
    """The experiment and overrides both models of a pair are measured under: those of the run
    that trained the base model (a pipeline run, ``<run>/seed<k>/base``); for a ``train.py``
    base (``compare.py``'s ERM cell, trained under ``<family>/baseline``, which has no concept
    spec) the family's default recipe ``<family>/cd``, as the pipeline pairs are measured."""
    if (base.parent.parent / ".hydra" / "overrides.yaml").is_file():
        return _overrides(base.parent.parent)
    own = [o for o in _overrides(base) if not o.startswith(("method=", "seed=", "paths.", "++protocols."))]
    return [re.sub(r"^experiment=(.+)/baseline$", r"experiment=\1/cd", o) for o in own]


def _strict_ckpt(stage_dir: Path) -> Path:
    """The checkpoint strict selection chose in a training run folder (else its last weights)."""
    sel = json.loads((stage_dir / "selection.json").read_text())["strict"]
    if sel["file"]:
        return Path(sel["file"])
    return stage_dir / "student.pt"


def _base_dir(run: Path, seed: int) -> Path:
    """The base model's training folder: this run's, or the one ``pipeline.base_ckpt`` reused."""
    for o in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()):
        if o.startswith("pipeline.base_ckpt="):
            return Path(o.split("=", 1)[1]).parent
    return run / f"seed{seed}" / "base"


def _auto_layer(run: Path, seed: int) -> str:
    """``model.layer=auto``'s choice on this base model: this run's, the run's that trained the base
    model, or the default recipe's of the same family and seed."""
    own = run / f"seed{seed}" / "layer_choice.json"
    base_run = _base_dir(run, seed).parent / "layer_choice.json"  # the run that trained the base model
    recipe_run = run.parent / f"cd_seed{seed}" / f"seed{seed}" / "layer_choice.json"
    for f in (own, base_run, recipe_run):
        if f.exists():
            return str(json.loads(f.read_text())["layer"])
    raise SystemExit(f"no layer_choice.json for {run} (run the default recipe of this family and seed first)")


def _measure_argv(stage_dir: Path, overrides: list[str], out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "cdistill.cli.measure", *overrides, f"measure.ckpt={_strict_ckpt(stage_dir)}",
            *extra, f"measure.out={out}", f"hydra.run.dir={out}"]


def _run(argv: list[str]) -> None:
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    if proc.returncode:
        raise SystemExit(f"measure failed: {' '.join(argv)}\n{proc.stderr[-3000:]}")


def reliance_layer(base_stage: Path, overrides: list[str]) -> dict[str, Any]:
    """The reliance layer rule's scan of the base model (``measure.measures=[reliance_layer]``, cached)."""
    out = base_stage / f"reliance_layer{_seed_tag(overrides)}"
    if not (out / "reliance_layer.json").exists():
        _run(_measure_argv(base_stage, overrides, out, ["measure.measures=[reliance_layer]"]))
    return dict(json.loads((out / "reliance_layer.json").read_text()))


def _experiment(overrides: list[str]) -> str:
    return next((o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")), "")


def _seed_tag(overrides: list[str]) -> str:
    """``_seed<N>`` for the measures taken on the data of seed N (earlier caches, drawn with the
    config's seed 0 whatever the run's, are not reused)."""
    seed = next((o.split("=", 1)[1] for o in overrides if o.startswith("seed=")), None)
    return "" if seed is None else f"_seed{seed}"


def _cache_dir(stage_dir: Path, overrides: list[str], layer: str, subspace: str = "cavs") -> Path:
    """``measure_<layer>`` (``measure_<layer>_leace`` for the LEACE subspace), unless it holds a
    measure under another experiment (then ``..._<experiment>``): the CAVs' row mode, and so the
    bias subspace, is the experiment's."""
    suffix = "" if subspace == "cavs" else f"_{subspace}"
    suffix += _seed_tag(overrides)
    out = stage_dir / f"measure_{layer}{suffix}"
    recorded = out / ".hydra" / "overrides.yaml"
    if recorded.exists() and _experiment(yaml.safe_load(recorded.read_text())) != _experiment(overrides):
        return stage_dir / f"measure_{layer}{suffix}_{_experiment(overrides).replace('/', '-')}"
    return out


def measure(stage_dir: Path, overrides: list[str], layer: str, subspace: str = "cavs") -> dict[str, float]:
    """cdistill-measure on the strict checkpoint of ``stage_dir`` at ``layer`` (cached), ablating
    the bias subspace ``subspace`` (``measure.reliance.subspace``)."""
    out = _cache_dir(stage_dir, overrides, layer, subspace)
    if not (out / "measure.json").exists():
        _run(_measure_argv(stage_dir, overrides, out, [
            f"measure.measures={MEASURES}", "measure.splits=[test]", f"measure.reliance.layer={layer}",
            f"measure.tcav.layer={layer}", f"measure.reliance.subspace={subspace}"]))
    return dict(json.loads((out / "measure.json").read_text()))


def _tcav(m: dict[str, float]) -> float:
    """The bias concept's TCAV score (the measure's summary over the concept's values)."""
    return float(m.get("tcav", float("nan")))


def pair(run: Path, rule: str = "reliance", subspace: str = "cavs") -> dict[str, Any]:
    """One pair's row: both models measured at the layer ``rule`` chooses on the base model,
    ablating the bias subspace ``subspace`` there."""
    family, (name, seed_s) = run.parent.name, run.name.rsplit("_seed", 1)
    seed = int(seed_s)
    base = _base_dir(run, seed)
    # The run's own seed: the data (splits, cues) is drawn from it, and cdistill-measure refuses another.
    overrides = [*_measure_overrides(base), f"seed={seed}"]
    t0 = time.time()
    layer = reliance_layer(base, overrides)["layer"] if rule == "reliance" else _auto_layer(run, seed)
    scan_s = time.time() - t0
    before = measure(base, overrides, layer, subspace)
    after = measure(run / f"seed{seed}" / "cd", overrides, layer, subspace)
    row: dict[str, Any] = {"family": family, "name": name, "seed": seed, "layer": layer, "layer_rule": rule,
                           "subspace": subspace,
                           "run_dir": str(run), "scan_s": round(scan_s, 1), "measure_s": round(time.time() - t0 - scan_s, 1),
                           "chance": before["reliance/chance"]}
    for tag, m in (("before", before), ("after", after)):
        row[f"conflicting_{tag}"] = 100 * m["test/acc_conflicting"]
        row[f"test_{tag}"] = 100 * m["test/acc"]
        for col, key, _ in DROPS:
            row[f"{col}_{tag}"] = _tcav(m) if key == "tcav" else float(m[key])
    row["gain"] = row["conflicting_after"] - row["conflicting_before"]
    for col, _, kind in DROPS:
        b, a = row[f"{col}_before"], row[f"{col}_after"]
        ref = b - row["chance"] if kind == "to_chance" else b
        row[f"{col}_drop"] = b - a
        row[f"{col}_rel_drop"] = (b - a) / ref if abs(ref) > 1e-12 else float("nan")
    row["agreement_scaled_drop"] = row["agreement_drop"] / (1.0 - row["chance"])
    return row


def _rho(rows: list[dict[str, Any]], key: str | None) -> tuple[str, str, int]:
    """Spearman ρ and p of the drop ``key`` with the gain over the pairs where it is finite."""
    if key is None:
        return "-", "-", 0
    gains = np.array([r["gain"] for r in rows])
    drops = np.array([r.get(key, float("nan")) for r in rows], dtype=float)
    ok = np.isfinite(drops)
    rho, p = spearmanr(drops[ok], gains[ok]) if ok.sum() > 2 else (float("nan"), float("nan"))
    return f"{rho:.2f}", f"{p:.1g}", int(ok.sum())


def table(rows: list[dict[str, Any]]) -> str:
    rows = [r | {"agreement_scaled_drop": _scaled(r)} for r in rows]
    md = [f"Spearman ρ of each measure's drop with the gain in bias-conflicting test accuracy, over {len(rows)} pairs:",
          "", "| measure | drop | ρ | p | ρ, relative drop | p | pairs with a relative drop |", "|---|---|---|---|---|---|---|"]
    for label, which, key, rel in RHO_ROWS:
        rho, p, _ = _rho(rows, key)
        rrho, rp, n = _rho(rows, rel)
        md.append(f"| {label} | {which} | {rho} | {p} | {rrho} | {rp} | {n if rel else '-'} |")
    md += ["", "Per setting, mean ± std over its seeds (KL drop: relative, per seed):", "",
           "| family | setting | seeds | layer | conflicting acc before → after | agreement before → after (chance) | "
           "ablation KL before → after | KL drop | causal share before → after | TCAV before → after |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["name"]), []).append(r)
    for (family, name), rs in sorted(groups.items()):
        def ms(key: str, scale: float = 1.0, rs: list[dict[str, Any]] = rs) -> str:
            return mean_std([scale * r[key] for r in rs], sci=key.startswith("ablation_kl_") and "drop" not in key)
        layers = ",".join(dict.fromkeys(str(r["layer"]) for r in rs))
        md.append(f"| {family} | {name} | {','.join(str(r['seed']) for r in rs)} | {layers} | {ms('conflicting_before')} → "
                  f"{ms('conflicting_after')} | {ms('agreement_before', 100)} → {ms('agreement_after', 100)} "
                  f"({100 * rs[0]['chance']:.0f}) | {ms('ablation_kl_before')} → {ms('ablation_kl_after')} | "
                  f"{ms('ablation_kl_rel_drop', 100)}% | {ms('causal_share_before')} → {ms('causal_share_after')} | "
                  f"{ms('tcav_before')} → {ms('tcav_after')} |")
    md += ["", "| family | pair | seed | layer | conflicting acc before → after | gain | agreement (chance) before → after | "
           "agreement drop, chance-scaled | ablation KL before → after | causal share before → after | TCAV before → after |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["name"], r["seed"])):
        md.append(f"| {r['family']} | {r['name']} | {r['seed']} | {r['layer']} | {r['conflicting_before']:.1f} → "
                  f"{r['conflicting_after']:.1f} | {r['gain']:+.1f} | {r['agreement_before']:.2f} → {r['agreement_after']:.2f} "
                  f"({r['chance']:.2f}) | {_scaled(r):.2f} | {r['ablation_kl_before']:.3g} → {r['ablation_kl_after']:.3g} | "
                  f"{r['causal_share_before']:.2f} → {r['causal_share_after']:.2f} | {r['tcav_before']:.2f} → {r['tcav_after']:.2f} |")
    return "\n".join(md)


def _scaled(r: dict[str, Any]) -> float:
    """The chance-scaled agreement drop (computed here for rows written before it was recorded)."""
    return float(r.get("agreement_scaled_drop", r["agreement_drop"] / (1.0 - r["chance"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", type=Path, default=[ROOT / "logs" / "generality"])
    ap.add_argument("--families", nargs="+", default=None, help="only these families")
    ap.add_argument("--names", nargs="+", default=None, help="only these run names (cd, cd_best, leace, ...)")
    ap.add_argument("--layer-rule", choices=RULES, default="reliance",
                    help="where each base model is measured (see the module docstring)")
    ap.add_argument("--subspace", choices=SUBSPACES, default="cavs",
                    help="the bias subspace ablated (measure.reliance.subspace): the bias CAVs' span, or the "
                         "subspace a LEACE eraser of the bias edits (fitted on validation inputs); same layer either way")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reliance_pairs.jsonl")
    ap.add_argument("--table", type=Path, default=None, help="print the table of a JSONL file and exit")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]))
        return
    runs = sorted(p.parent for root in args.runs for p in root.glob("*/*_seed*/pipeline.json")
                  if not p.parent.name.startswith("oracle_"))
    runs = [r for r in runs if (args.families is None or r.parent.name in args.families)
            and (args.names is None or r.name.rsplit("_seed", 1)[0] in args.names)]
    rows = []
    for run in runs:
        row = pair(run, args.layer_rule, args.subspace)
        rows.append(row)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
