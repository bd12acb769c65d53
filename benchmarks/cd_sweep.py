"""Sweep concept-distillation knobs through the whole pipeline, one setting at a time.

    python benchmarks/cd_sweep.py --name lc10 --seeds 0 -- experiment=color_mnist/cd_gradient model.lambda_c=10
    python benchmarks/cd_sweep.py --table benchmarks/results/cd_sweep.jsonl

Each call runs ``pipeline.py`` (base model -> concept distillation -> test under every
model-selection protocol) with the given Hydra overrides and ``pipeline.tcav.enabled=false``
(TCAV is not needed to rank settings; ``--tcav`` keeps it), then appends one JSON line per call to ``--out``:
the overrides, the seeds and, per protocol, the distilled model's test accuracy per seed next
to the base model's (same run). ``--table`` prints the markdown table of a JSONL file (mean ±
std over seeds). Model selection is by the validation protocols only; the test set is read,
never tuned on.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's cdistill, not an installed one

from cdistill.utils.formatting import mean_std  # noqa: E402

PROTOCOLS = ("paper", "strict", "last")


def run(name: str, overrides: list[str], seeds: list[int], out: Path, tcav: bool = False) -> dict[str, Any]:
    run_dir = ROOT / "logs" / "cd_sweep" / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"
    cmd = [
        sys.executable, str(ROOT / "pipeline.py"), *overrides,
        f"pipeline.seeds=[{','.join(map(str, seeds))}]", f"pipeline.tcav.enabled={str(tcav).lower()}",
        f"hydra.run.dir={run_dir}",
    ]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    (run_dir).mkdir(parents=True, exist_ok=True)
    (run_dir / "sweep.log").write_text(proc.stdout[-20000:] + "\n" + proc.stderr[-20000:])
    experiments = [o.split("=", 1)[1] for o in overrides if o.startswith("experiment=")]
    task = experiments[0].split("/")[0] if experiments else "?"
    rec: dict[str, Any] = {"name": name, "overrides": overrides, "seeds": seeds, "wall_s": round(wall, 1),
                           "task": task, "run_dir": str(run_dir.relative_to(ROOT)), "rc": proc.returncode}
    if proc.returncode == 0:
        per_seed = json.loads((run_dir / "pipeline.json").read_text())
        for proto in PROTOCOLS:
            rec[proto] = [100 * r["cd"][f"{proto}/test/acc"] for r in per_seed]
            rec[f"base_{proto}"] = [100 * r["base"][f"{proto}/test/acc"] for r in per_seed]
        rec["val"] = [100 * r["cd"]["val/acc"] for r in per_seed]
        if tcav:
            rec["tcav"] = [r["cd"]["tcav"] for r in per_seed]
            rec["base_tcav"] = [r["base"]["tcav"] for r in per_seed]
        rec["best_val_reversed"] = best_val_reversed(run_dir, seeds)
    else:
        rec["error"] = proc.stderr[-2000:]
    with out.open("a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def best_val_reversed(run_dir: Path, seeds: list[int]) -> list[float]:
    """Best ``val_reversed/acc`` (%) over the distilled run's epochs, per seed: the validation
    number the settings are ranked by (the paper protocol's selection metric; never the test set)."""
    out = []
    for seed in seeds:
        vals = []
        for f in (run_dir / f"seed{seed}" / "cd").rglob("metrics.csv"):
            with f.open() as fh:
                vals += [float(r["val_reversed/acc"]) for r in csv.DictReader(fh) if r.get("val_reversed/acc")]
        out.append(100 * max(vals) if vals else float("nan"))
    return out


def cell(vals: list[float] | None) -> str:
    return mean_std(vals or [], bare_single=True)


def table(path: Path) -> str:
    rows = ["| setting | knobs (overrides; `model.` dropped) | seeds | best val_reversed | paper | strict | last | "
            "base (paper/strict/last) | s |",
            "|---|---|---|---|---|---|---|---|---|"]
    for line in path.read_text().splitlines():
        r = json.loads(line)
        knobs = " ".join(o.replace("model.", "") for o in r["overrides"])
        if r.get("rc"):
            rows.append(f"| {r['name']} | `{knobs}` | {r['seeds']} | failed | | | | | |")
            continue
        base = "/".join(cell(r[f"base_{p}"]) for p in PROTOCOLS)
        vrev = r.get("best_val_reversed") or best_val_reversed(ROOT / r["run_dir"], r["seeds"])
        rows.append(f"| {r['name']} | `{knobs}` | {','.join(map(str, r['seeds']))} | {cell(vrev)} | {cell(r['paper'])} | "
                    f"{cell(r['strict'])} | {cell(r['last'])} | {base} | {r['wall_s']:.0f} |")
    return "\n".join(rows)


def final_table(path: Path, prefix: str = "FINAL_") -> str:
    """Mean ± std table of the runs whose name starts with ``prefix`` (one row each)."""
    rows = ["| dataset | setting | seeds | paper | strict | last | base paper / strict / last | bias TCAV base -> CD |",
            "|---|---|---|---|---|---|---|---|"]
    runs = [json.loads(line) for line in path.read_text().splitlines()]
    runs = sorted((r for r in runs if r["name"].startswith(prefix) and not r.get("rc")), key=lambda r: (r["task"], r["name"]))
    for r in runs:
        exp = next((o.split("=", 1)[1] for o in r["overrides"] if o.startswith("experiment=")), "?")
        base = " / ".join(cell(r[f"base_{p}"]) for p in PROTOCOLS)
        tcav = f"{np.mean(r['base_tcav']):.2f} -> {np.mean(r['tcav']):.2f}" if "tcav" in r else "-"
        rows.append(f"| {r['task']} | `{exp}` | {','.join(map(str, r['seeds']))} | {cell(r['paper'])} | "
                    f"{cell(r['strict'])} | {cell(r['last'])} | {base} | {tcav} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="run")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cd_sweep.jsonl")
    ap.add_argument("--tcav", action="store_true", help="keep the pipeline's TCAV of the bias concept")
    ap.add_argument("--table", type=Path, default=None, help="print the table of this JSONL file and exit")
    ap.add_argument("--final", type=Path, default=None, help="print the mean ± std table of its FINAL_ runs and exit")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    if args.final:
        print(final_table(args.final))
        return
    rec = run(args.name, args.overrides, [int(s) for s in args.seeds.split(",")], args.out, tcav=args.tcav)
    print(json.dumps({k: v for k, v in rec.items() if k != "error"}), rec.get("error", ""))


if __name__ == "__main__":
    main()
