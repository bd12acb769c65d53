"""Run the erasure experiments through the pipeline and put their results in one table.

    python benchmarks/erasure_experiments.py --out benchmarks/results/erasure_experiments.md
    python benchmarks/erasure_experiments.py --benches color_mnist --methods leace --seeds 0

For every benchmark and method this runs ``pipeline.py experiment=<bench>/<method>`` (biased
base model -> fine-tuning with the eraser hooked in at the erased layer -> test under every
model-selection protocol, over ``--seeds``), then reads each run's ``pipeline.json`` and
writes a markdown table: reversed-bias test accuracy of the base model and of the erased
model per protocol, and a fresh linear probe's accuracy for the bias at the erased layer
with the erasers on and off (mean ± std over seeds, percent). ``--collect`` only re-reads
finished runs.
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

BENCHES = ("color_mnist", "decoy_mnist", "texture_mnist")
METHODS = ("leace", "pclarc", "inlp", "rlace")
PROTOCOLS = ("strict", "paper", "last")


def cell(records: list[dict], stage: str, key: str) -> str:
    return mean_std([r[stage][key] for r in records if key in r[stage]], scale=100.0, digits=1)


def table(runs: dict[tuple[str, str], list[dict]]) -> str:
    head = ["bench", "method", "seeds"]
    head += [f"base acc ({p})" for p in PROTOCOLS] + [f"erased acc ({p})" for p in PROTOCOLS]
    head += ["probe, erasers on", "probe, erasers off", "probe chance"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (bench, method), recs in runs.items():
        row = [bench, method, str(len(recs))]
        row += [cell(recs, "base", f"{p}/test/acc") for p in PROTOCOLS]
        row += [cell(recs, "cd", f"{p}/test/acc") for p in PROTOCOLS]
        row += [cell(recs, "cd", f"strict/test/{k}") for k in ("bias_probe_acc", "bias_probe_acc_unerased", "bias_probe_chance")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benches", nargs="+", default=list(BENCHES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--runs", default="logs/erasure_experiments", help="where the pipeline runs go")
    ap.add_argument("--out", default=None, help="markdown file for the table (default: print only)")
    ap.add_argument("--collect", action="store_true", help="only read finished runs")
    args = ap.parse_args()
    runs: dict[tuple[str, str], list[dict]] = {}
    started = time.time()
    for bench in args.benches:
        for method in args.methods:
            run_dir = Path(args.runs) / f"{bench}_{method}"
            cmd = [sys.executable, str(ROOT / "pipeline.py"), f"experiment={bench}/{method}",
                   f"pipeline.seeds=[{','.join(map(str, args.seeds))}]", f"hydra.run.dir={run_dir}"]
            if not args.collect:
                t0 = time.time()
                res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
                (run_dir / "stdout.log").parent.mkdir(parents=True, exist_ok=True)
                (run_dir / "stdout.log").write_text(res.stdout + res.stderr)
                status = "ok" if res.returncode == 0 else f"FAILED ({res.returncode})"
                print(f"{bench}/{method}: {status} in {time.time() - t0:.0f} s", flush=True)
            result = run_dir / "pipeline.json"
            if result.is_file():
                runs[(bench, method)] = json.loads(result.read_text())
    md = [
        "# Erasure experiments: reversed-bias test accuracy and bias probes",
        "",
        f"- command: `python benchmarks/erasure_experiments.py {' '.join(sys.argv[1:])}`",
        f"- date: {datetime.date.today()}; machine: {platform.machine()}, {os.cpu_count()} CPUs, "
        f"no GPU; wall time {time.time() - started:.0f} s",
        f"- seeds {args.seeds}; accuracies in % (mean ± std over seeds) on the reversed-bias test "
        "split; model selection: strict = best in-distribution val acc, paper = best "
        "reversed-bias val acc, last = last epoch. Probe: logistic regression for the bias id "
        "at the erased layer (mean over positions), fitted on half of the in-distribution val "
        "split and scored on the other half, strict-selection model.",
        "",
        table(runs),
        "",
    ]
    text = "\n".join(md)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
