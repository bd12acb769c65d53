"""Do the reliance measures agree with accuracy? (issue: know whether a model relies on a concept)

    python benchmarks/reliance.py --runs logs/generality logs/rel --out benchmarks/results/reliance_pairs.jsonl
    python benchmarks/reliance.py --table benchmarks/results/reliance_pairs.jsonl

Every pipeline run under ``--runs`` (``<family>/<name>_seed<k>/``, as ``benchmarks/generality.py``
writes them) is one pair: the biased base model and the model fine-tuned (or erased) from it.
Both are measured from the checkpoint strict selection chose (``selection.json``) with
``cdistill-measure measure.measures=[accuracy,tcav,reliance]`` under the run's own experiment and
overrides, at one layer per base model: the layer ``model.layer=auto`` chooses on it (the
default recipe's ``layer_choice.json`` of the same family and seed), so that before and after,
and every pair on one base, are measured at the same place. Each measurement is cached in
``<stage dir>/measure_<layer>/measure.json``.

Per pair, each measure's *drop* ``m0 - m1`` (before minus after; concept-only agreement,
concept-ablation KL, causal share in the bias subspace, and TCAV of the bias concept), and the
*gain*: bias-conflicting test accuracy after minus before (points). The table gives each
measure's Spearman ρ with the gain over all pairs (TCAV beside them), and the pairs. The drop
relative to what there was to lose (``(a0 - a1) / (a0 - chance)`` for the agreement,
``(m0 - m1) / m0`` for the others) is reported as well; it is undefined where the base model
does not rely on the concept (agreement at chance, KL ~0), which is why the absolute drop is
the primary one.
"""

from __future__ import annotations

import argparse
import json
import os
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


def _overrides(run: Path) -> list[str]:
    """The run's experiment and model/data overrides (not the pipeline's or Hydra's own)."""
    lines = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    return [o for o in lines if not o.startswith(("pipeline.", "hydra."))]


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


def _layer(run: Path, seed: int) -> str:
    """``model.layer=auto``'s choice on this base model: this run's, the run's that trained the base
    model, or the default recipe's of the same family and seed."""
    own = run / f"seed{seed}" / "layer_choice.json"
    base_run = _base_dir(run, seed).parent / "layer_choice.json"  # the run that trained the base model
    recipe_run = run.parent / f"cd_seed{seed}" / f"seed{seed}" / "layer_choice.json"
    for f in (own, base_run, recipe_run):
        if f.exists():
            return str(json.loads(f.read_text())["layer"])
    raise SystemExit(f"no layer_choice.json for {run} (run the default recipe of this family and seed first)")


def measure(stage_dir: Path, overrides: list[str], layer: str) -> dict[str, float]:
    """cdistill-measure on the strict checkpoint of ``stage_dir`` (cached)."""
    out = stage_dir / f"measure_{layer}"
    if not (out / "measure.json").exists():
        argv = [sys.executable, "-m", "cdistill.cli.measure", *overrides, f"measure.ckpt={_strict_ckpt(stage_dir)}",
                f"measure.measures={MEASURES}", "measure.splits=[test]", f"measure.reliance.layer={layer}", f"measure.tcav.layer={layer}",
                f"measure.out={out}", f"hydra.run.dir={out}"]
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
        if proc.returncode:
            raise SystemExit(f"measure failed: {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return dict(json.loads((out / "measure.json").read_text()))


def _tcav(m: dict[str, float]) -> float:
    """The bias concept's TCAV score (the measure's summary over the concept's values)."""
    return float(m.get("tcav", float("nan")))


def pair(run: Path) -> dict[str, Any]:
    family, (name, seed_s) = run.parent.name, run.name.rsplit("_seed", 1)
    seed = int(seed_s)
    overrides, layer = _overrides(run), _layer(run, seed)
    t0 = time.time()
    before = measure(_base_dir(run, seed), overrides, layer)
    after = measure(run / f"seed{seed}" / "cd", overrides, layer)
    row: dict[str, Any] = {"family": family, "name": name, "seed": seed, "layer": layer, "run_dir": str(run),
                           "measure_s": round(time.time() - t0, 1), "chance": before["reliance/chance"]}
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
    return row


def table(rows: list[dict[str, Any]]) -> str:
    gains = np.array([r["gain"] for r in rows])
    md = [f"Spearman ρ of each measure's drop with the gain in bias-conflicting test accuracy, over {len(rows)} pairs:",
          "", "| measure | ρ, absolute drop (primary) | p | ρ, relative drop | p | pairs with a relative drop |",
          "|---|---|---|---|---|---|"]
    for col, _, _ in DROPS:
        cells = []
        for suffix in ("_drop", "_rel_drop"):
            drops = np.array([r.get(f"{col}{suffix}", float("nan")) for r in rows], dtype=float)
            ok = np.isfinite(drops)
            rho, p = spearmanr(drops[ok], gains[ok]) if ok.sum() > 2 else (float("nan"), float("nan"))
            cells += [f"{rho:.2f}", f"{p:.1g}"]
        md.append(f"| {col}{' (for comparison)' if col == 'tcav' else ''} | {' | '.join(cells)} | {int(ok.sum())} |")
    md += ["", "Per setting, mean ± std over its seeds (KL drop: relative, per seed):", "",
           "| family | setting | seeds | conflicting acc before → after | agreement before → after (chance) | "
           "ablation KL before → after | KL drop | causal share before → after | TCAV before → after |",
           "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["name"]), []).append(r)
    for (family, name), rs in sorted(groups.items()):
        def ms(key: str, scale: float = 1.0, rs: list[dict[str, Any]] = rs) -> str:
            return mean_std([scale * r[key] for r in rs], sci=key.startswith("ablation_kl_") and "drop" not in key)
        md.append(f"| {family} | {name} | {','.join(str(r['seed']) for r in rs)} | {ms('conflicting_before')} → "
                  f"{ms('conflicting_after')} | {ms('agreement_before', 100)} → {ms('agreement_after', 100)} "
                  f"({100 * rs[0]['chance']:.0f}) | {ms('ablation_kl_before')} → {ms('ablation_kl_after')} | "
                  f"{ms('ablation_kl_rel_drop', 100)}% | {ms('causal_share_before')} → {ms('causal_share_after')} | "
                  f"{ms('tcav_before')} → {ms('tcav_after')} |")
    md += ["", "| family | pair | seed | layer | conflicting acc before → after | gain | agreement (chance) before → after | "
           "ablation KL before → after | causal share before → after | TCAV before → after |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["family"], r["name"], r["seed"])):
        md.append(f"| {r['family']} | {r['name']} | {r['seed']} | {r['layer']} | {r['conflicting_before']:.1f} → "
                  f"{r['conflicting_after']:.1f} | {r['gain']:+.1f} | {r['agreement_before']:.2f} → {r['agreement_after']:.2f} "
                  f"({r['chance']:.2f}) | {r['ablation_kl_before']:.3g} → {r['ablation_kl_after']:.3g} | "
                  f"{r['causal_share_before']:.2f} → {r['causal_share_after']:.2f} | {r['tcav_before']:.2f} → {r['tcav_after']:.2f} |")
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", type=Path, default=[ROOT / "logs" / "generality"])
    ap.add_argument("--families", nargs="+", default=None, help="only these families")
    ap.add_argument("--names", nargs="+", default=None, help="only these run names (cd, cd_best, leace, ...)")
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
        row = pair(run)
        rows.append(row)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
