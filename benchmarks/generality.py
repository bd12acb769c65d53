"""Gap closed to the oracle by a concept recipe, per bias family (issue: concept debiasing that generalizes).

    python benchmarks/generality.py --families color_mnist texture_mnist decoy_mnist marker_mnist faces \\
        --seeds 1 2 3 --runs logs/generality --out benchmarks/results/generality_runs.jsonl
    python benchmarks/generality.py --table benchmarks/results/generality_runs.jsonl

Per family and seed: ``pipeline.py experiment=<family>/<recipe>`` (the biased base model, then the
fine-tune from it, each tested under every selection protocol from the checkpoint that protocol
selected: ``selection.json``), and the oracle ``train.py experiment=<family>/baseline
data.unbiased=true`` (the same data with the bias decorrelated in training). Appends one JSON line
per (family, seed, recipe): test accuracy (%) of base, fine-tuned and oracle under each protocol,
and the gap closed ``(CD - base) / (oracle - base)`` under strict selection. ``--table`` prints the
markdown table (mean ± std over seeds; the gap closed of the means, and the mean of per-seed gaps).
``--jobs N`` runs N runs at once, each with one thread (results equal the one-thread serial runs'). Extra Hydra overrides after ``--`` apply to the fine-tune (a variant: ``--name`` labels it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's cdistill, not an installed one

from cdistill.utils.formatting import mean_std  # noqa: E402

PROTOCOLS = ("strict", "paper", "last")
#: Where the base model sits within a few points of its oracle the gap is too narrow to measure.
MIN_GAP = 5.0


#: Extra environment of every run (``--jobs`` > 1 pins each run to one thread).
RUN_ENV: dict[str, str] = {"WANDB_MODE": "offline"}


def _run(argv: list[str], log: Path) -> float:
    t0 = time.time()
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **RUN_ENV})
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout[-20000:] + "\n" + proc.stderr[-20000:])
    if proc.returncode:
        raise SystemExit(f"failed ({log}): {' '.join(argv)}\n{proc.stderr[-3000:]}")
    return time.time() - t0


def oracle(family: str, seed: int, runs: Path, overrides: Sequence[str] = (), folder: str | None = None,
           unbiased: Sequence[str] = ("data.unbiased=true",)) -> dict[str, float]:
    """The oracle's metrics (trained once per family and seed, reused): ``train.py
    experiment=<family>/baseline data.unbiased=true`` in ``<runs>/<folder or family>/oracle_seed<N>``,
    with extra Hydra ``overrides`` (e.g. a ``data.root``). ``unbiased``: the overrides that make
    the data unbiased (``()`` where ``overrides`` do, e.g. a folder dataset's unbiased copy as ``data.root``)."""
    out = runs / (folder or family) / f"oracle_seed{seed}"
    if not (out / "metrics.json").exists():
        _run(["train.py", f"experiment={family}/baseline", *unbiased, f"seed={seed}", *overrides,
              f"paths.output_dir={out}", f"hydra.run.dir={out}"], out / "run.log")
    return json.loads((out / "metrics.json").read_text())


def run_dir(runs: Path, family: str, name: str, seed: int) -> Path:
    """The pipeline folder of one (family, variant, seed)."""
    return runs / family / f"{name}_seed{seed}"


def fine_tune(family: str, seed: int, recipe: str, name: str, overrides: list[str], runs: Path) -> float:
    """Run the pipeline (base model, then the fine-tune) of one (family, seed); its wall seconds."""
    out = run_dir(runs, family, name, seed)
    return _run(["pipeline.py", f"experiment={family}/{recipe}", f"pipeline.seeds=[{seed}]",
                 "pipeline.tcav.enabled=false", "pipeline.reliance.enabled=false", *overrides, f"hydra.run.dir={out}"],
                out / "run.log")


def row_of(family: str, seed: int, recipe: str, name: str, overrides: list[str], runs: Path, wall: float) -> dict[str, Any]:
    """The JSON row of a finished (family, seed): its pipeline's figures beside its oracle's."""
    out = run_dir(runs, family, name, seed)
    rec = json.loads((out / "pipeline.json").read_text())[0]
    orc = oracle(family, seed, runs)
    row: dict[str, Any] = {"family": family, "seed": seed, "recipe": recipe, "name": name, "overrides": overrides,
                           "run_dir": str(out), "wall_s": round(wall, 1)}
    for proto in PROTOCOLS:
        row[f"base_{proto}"] = 100 * rec["base"][f"{proto}/test/acc"]
        row[f"cd_{proto}"] = 100 * rec["cd"][f"{proto}/test/acc"]
        row[f"oracle_{proto}"] = 100 * orc[f"{proto}/test/acc"]
    gap = row["oracle_strict"] - row["base_strict"]
    row["gap_closed"] = (row["cd_strict"] - row["base_strict"]) / gap if gap > MIN_GAP else None
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (family, name), mean ± std over its seeds."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["name"]), []).append(r)
    md = ["| family | recipe | seeds | base (strict) | fine-tuned (strict) | oracle (strict) | gap closed, of means | gap closed, per seed | fine-tuned (paper) | fine-tuned (last) | wall s / seed |",
          "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (family, name), rs in groups.items():
        col = {k: [r[k] for r in rs] for k in rs[0] if k.startswith(("base_", "cd_", "oracle_"))}
        b, c, o = (float(np.mean(col[f"{s}_strict"])) for s in ("base", "cd", "oracle"))
        of_means = f"{100 * (c - b) / (o - b):.0f}%" if o - b > MIN_GAP else "n/a (base within 5 points of oracle)"
        gaps = [r["gap_closed"] for r in rs if r["gap_closed"] is not None]
        per_seed = f"{100 * np.mean(gaps):.0f} ± {100 * np.std(gaps):.0f}%" if gaps else "n/a"
        md.append(f"| {family} | {name} | {','.join(str(r['seed']) for r in rs)} | {mean_std(col['base_strict'])} | "
                  f"{mean_std(col['cd_strict'])} | {mean_std(col['oracle_strict'])} | {of_means} | {per_seed} | "
                  f"{mean_std(col['cd_paper'])} | {mean_std(col['cd_last'])} | {np.mean([r['wall_s'] for r in rs]):.0f} |")
    return "\n".join(md)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--families", nargs="+", default=[])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--recipe", default="cd", help="the experiment under <family>/ (default: cd, the default recipe)")
    ap.add_argument("--name", default=None, help="label of this variant (default: the recipe)")
    ap.add_argument("--runs", type=Path, default=ROOT / "logs" / "generality")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "generality_runs.jsonl")
    ap.add_argument("--table", type=Path, default=None, help="print the table of a JSONL file and exit")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once (> 1: each run with one thread)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides of the fine-tune (after --)")
    args = ap.parse_args()
    if args.table:
        print(table([json.loads(line) for line in args.table.read_text().splitlines() if line.strip()]))
        return
    if args.jobs > 1:
        # Parallel runs each get one thread: the cores are shared out by runs, not by threads,
        # and results stay those of the one-thread runs (torch's results depend on the thread count).
        RUN_ENV.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    name = args.name or args.recipe
    cells = [(family, seed) for family in args.families for seed in args.seeds]
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        # Fine-tunes first (the long runs), then the oracles, so the last runs to start are short.
        walls = {c: pool.submit(fine_tune, *c, args.recipe, name, args.overrides, args.runs) for c in cells}
        oracles = {c: pool.submit(oracle, *c, args.runs) for c in cells}
        for (family, seed), wall in walls.items():
            # Each row is written as soon as its own runs are done, so a later failure loses no finished row.
            oracles[family, seed].result()
            row = row_of(family, seed, args.recipe, name, args.overrides, args.runs, wall.result())
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    print(f"wall time of the whole command: {time.time() - t0:.0f} s ({args.jobs} job(s))", flush=True)


if __name__ == "__main__":
    main()
