"""IID benchmark: baseline vs concept-distilled decomposition on synthetic scenes, over seeds.

Runs ``train.py experiment=iid/<variant> seed=<s>`` for each variant and seed (one process at
a time, one thread), reads each run's ``metrics.json`` and writes a markdown table of the
scale-invariant MSE of reflectance and shading on the test scenes lit differently from
training (``test``) and on same-light test scenes (``test_same_light``), mean ± std over seeds,
for each model-selection protocol (``strict``: in-distribution validation, ``paper``:
validation scenes lit like the test scenes, ``last``: the last epoch).

    python benchmarks/iid_experiments.py --seeds 1 2 3 --out benchmarks/results/iid.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's cdistill, not an installed one

from cdistill.utils.formatting import mean_std  # noqa: E402

KEYS = [("test", "r_mse"), ("test", "s_mse"), ("test_same_light", "r_mse"), ("test_same_light", "s_mse")]


def run(variant: str, seed: int, out: Path, extra: list[str], reuse: bool = False) -> dict[str, float]:
    """One training run; returns its metrics (``reuse``: an earlier run's, when it finished)."""
    run_dir = out / f"{variant.replace('/', '_')}_seed{seed}"
    cmd = [sys.executable, str(ROOT / "train.py"), f"experiment={variant}", f"seed={seed}", "logger=csv",
           "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", *extra]
    if reuse and (run_dir / "metrics.json").is_file():
        print(f"{variant} seed {seed}: reusing {run_dir}", flush=True)
        return {k: float(v) for k, v in json.loads((run_dir / "metrics.json").read_text()).items()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    print(f"{variant} seed {seed}: {time.time() - t0:.0f} s, test R {metrics['test/r_mse']:.4f} "
          f"S {metrics['test/s_mse']:.4f}", flush=True)
    return {k: float(v) for k, v in metrics.items()}


def cell(values: list[float]) -> str:
    return mean_std(values, digits=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=["iid/baseline", "iid/cd"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "iid.md")
    parser.add_argument("--runs", type=Path, default=ROOT / "logs" / "iid_benchmark")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs found under --runs")
    parser.add_argument("extra", nargs="*", help="Hydra overrides for every run")
    args = parser.parse_args()
    t0 = time.time()
    results = {v: [run(v, s, args.runs, args.extra, args.reuse) for s in args.seeds] for v in args.variants}
    lines = [
        "# IID: baseline vs concept distillation on synthetic scenes",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/iid_experiments.py --seeds {' '.join(map(str, args.seeds))}"
        f" --variants {' '.join(args.variants)}{' ' + ' '.join(args.extra) if args.extra else ''}`",
        f"Machine: {platform.machine()}, {platform.processor() or platform.system()}, 1 thread (CPU). "
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Total time: {time.time() - t0:.0f} s.",
        "",
        "Scale-invariant MSE (lower is better), mean ± std over seeds "
        f"{', '.join(map(str, args.seeds))}. `test`: scenes lit differently from training (cool light from the "
        "left vs warm light from the right); `test_same_light`: training lights.",
        "",
    ]
    for proto in ("strict", "paper", "last"):
        lines += [f"**Selection: {proto}**", "",
                  "| variant | test R-MSE | test S-MSE | same-light R-MSE | same-light S-MSE |",
                  "|---|---|---|---|---|"]
        for v, runs in results.items():
            cells = [cell([r[f"{proto}/{split}/{m}"] for r in runs]) for split, m in KEYS]
            lines.append(f"| {v} | {' | '.join(cells)} |")
        lines.append("")
    lines += ["Per seed (strict selection, test R-MSE / S-MSE):", ""]
    for v, runs in results.items():
        per = ", ".join(f"seed {s}: {r['strict/test/r_mse']:.4f} / {r['strict/test/s_mse']:.4f}"
                        for s, r in zip(args.seeds, runs, strict=True))
        lines.append(f"- {v}: {per}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
