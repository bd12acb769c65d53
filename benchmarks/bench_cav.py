"""Benchmark: CAV fitting time and held-out accuracy, torch solvers vs scikit-learn.

Synthetic "activations" that look like real ones: ReLU of a low-rank signal plus noise,
with the concept shifting the mean along a direction that is partly inside the signal
subspace. Both libraries get the same split and the same preprocessed features (centred,
one global scale) and solve the same objectives (logistic: sklearn ``LogisticRegression``
with lbfgs; SVM: ``LinearSVC``, squared hinge). Torch timings include the preprocessing;
scikit-learn's do not. Besides scikit-learn's default tolerance, each scikit-learn model is
timed at the loosest tolerance of a ladder (1e-3 ... 1e-8) whose held-out accuracy equals
torch's on the same test rows: the comparison at equal accuracy. The load average
(``os.getloadavg``) is recorded before and after, since other processes change the times.

    python benchmarks/bench_cav.py --dims 3200 25088 --n 500 --out benchmarks/results/cav.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdistill.concepts.cav import fit_cav, stratified_split


def make_data(d: int, n: int, rank: int, strength: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Concept and negative activations ``[n, d]`` each (float32).

    The concept shift has norm ``strength * (d / 3200) ** (1 / 3)``, which keeps the
    held-out accuracy around 0.9 at both benchmark sizes.
    """
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, d, generator=g) * 2 / rank**0.5  # signal variance ~4 per feature
    inside = torch.randn(rank, generator=g) @ basis
    outside = torch.randn(d, generator=g)
    shift = inside / inside.norm() + outside / outside.norm()
    shift *= strength * (d / 3200) ** (1 / 3) / shift.norm()

    def sample(offset: torch.Tensor) -> torch.Tensor:
        signal = torch.randn(n, rank, generator=g) @ basis
        return torch.relu(signal + offset + torch.randn(n, d, generator=g) + 0.5)

    return sample(shift), sample(torch.zeros(d))


def timed(fn: Callable[[], tuple[float, str]], repeats: int) -> tuple[float, float, str]:
    """Median wall time (s) over ``repeats`` calls, and the last call's accuracy and note."""
    times, acc, note = [], float("nan"), ""
    for _ in range(repeats):
        start = time.perf_counter()
        acc, note = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), acc, note


TOL_LADDER = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)


def sk_fit(make: Callable[[float], Any], tol: float, data: tuple[np.ndarray, ...]) -> tuple[float, str]:
    """Fit a scikit-learn model at ``tol``; its held-out accuracy and iteration count."""
    model = make(tol).fit(data[0], data[1])
    return float(model.score(data[2], data[3])), str(int(np.max(model.n_iter_)))


def sk_cells(result: tuple[float, float, str], t_time: float) -> str:
    s_time, s_acc, iters = result
    return f"{s_time:.3f} | {s_acc:.4f} | {iters} | {s_time / t_time:.1f}x |"


def run(args: argparse.Namespace) -> list[str]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    device = torch.device(args.device)
    rows = [
        "| d | solver | torch (s) | torch acc | scikit-learn | sklearn (s) | sklearn acc | sklearn iters | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sk_models: dict[str, tuple[str, Callable[[float], Any]]] = {
        "logistic": ("LogisticRegression (lbfgs)",
                     lambda tol: LogisticRegression(C=args.C, max_iter=10_000, tol=tol)),
        "svm": ("LinearSVC", lambda tol: LinearSVC(C=args.C, max_iter=10_000, tol=tol)),
    }
    for d in args.dims:
        pos, neg = make_data(d, args.n, args.rank, args.strength, args.seed)
        pos_d, neg_d = pos.to(device), neg.to(device)
        fit_cav(pos_d[:50], neg_d[:50], "logistic")  # warm-up (BLAS/LAPACK, CUDA context)
        p_tr, p_te, n_tr, n_te = stratified_split(args.n, args.n, 0.3, args.seed)
        x_tr = torch.cat([pos[p_tr], neg[n_tr]])
        mean = x_tr.mean(0)
        scale = (x_tr - mean).pow(2).mean().sqrt()
        x_tr_np = ((x_tr - mean) / scale).numpy()
        x_te_np = ((torch.cat([pos[p_te], neg[n_te]]) - mean) / scale).numpy()
        y_tr = np.r_[np.ones(len(p_tr)), np.zeros(len(n_tr))]
        y_te = np.r_[np.ones(len(p_te)), np.zeros(len(n_te))]
        for solver in ("logistic", "svm", "ridge", "mean_diff"):
            def torch_fit(
                solver: str = solver, pos_d: torch.Tensor = pos_d, neg_d: torch.Tensor = neg_d
            ) -> tuple[float, str]:
                kw = {"C": args.C} if solver in ("logistic", "svm") else {}
                return fit_cav(pos_d, neg_d, solver, seed=args.seed, **kw).accuracy, ""

            t_time, t_acc, _ = timed(torch_fit, args.repeats)
            base = f"| {d} | {solver} | {t_time:.3f} | {t_acc:.4f} "
            if solver not in sk_models:
                rows.append(base + "| – | – | – | – | – |")
                print(rows[-1], flush=True)
                continue
            name, make = sk_models[solver]
            data = (x_tr_np, y_tr, x_te_np, y_te)
            default = timed(functools.partial(sk_fit, make, 1e-4, data), args.sk_repeats)
            rows.append(base + f"| {name}, tol=1e-4 (default) | " + sk_cells(default, t_time))
            print(rows[-1], flush=True)
            for tol in TOL_LADDER:  # loosest tolerance that reaches torch's held-out accuracy
                equal = timed(functools.partial(sk_fit, make, tol, data), args.sk_repeats)
                same = round(equal[1] * len(y_te)) == round(t_acc * len(y_te))
                if same:
                    break
            label = f"tol={tol:g}" + (" (loosest with torch's accuracy)" if same else " (never equal)")
            rows.append(base + f"| {name}, {label} | " + sk_cells(equal, t_time))
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[3200, 25088])
    parser.add_argument("--n", type=int, default=500, help="samples per class")
    parser.add_argument("--rank", type=int, default=20, help="rank of the shared signal")
    parser.add_argument("--strength", type=float, default=10.0, help="concept shift norm at d=3200")
    parser.add_argument("--C", type=float, default=1.0, help="inverse regularisation (both libraries)")
    parser.add_argument("--repeats", type=int, default=3, help="torch timing repeats (median)")
    parser.add_argument("--sk-repeats", type=int, default=1, help="scikit-learn timing repeats")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch and BLAS")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--out", type=Path, default=None, help="write a markdown report here")
    args = parser.parse_args()
    limits = contextlib.nullcontext()
    if args.threads:
        torch.set_num_threads(args.threads)
        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(args.threads)  # scikit-learn's BLAS/OpenMP
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores visible, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), device {args.device}"
    )
    print(machine, flush=True)
    load_before = os.getloadavg()
    with limits:
        rows = run(args)
    load_after = os.getloadavg()
    load = f"load average (1, 5, 15 min) before {load_before}, after {load_after}"
    print(load, flush=True)
    if args.out is not None:
        command = "python benchmarks/bench_cav.py " + " ".join(sys.argv[1:])
        header = [
            "# CAV fitting: torch solvers vs scikit-learn",
            "",
            f"- date: {args.date}",
            f"- command: `{command}`",
            f"- machine: {machine}",
            f"- {load}",
            f"- data: {args.n} concept + {args.n} negative samples, ReLU(rank-{args.rank} "
            f"signal + noise), concept shift norm {args.strength}·(d/3200)^(1/3); 70/30 "
            f"stratified split; C={args.C}; both libraries get the same centred, globally "
            "scaled float32 features (torch times include that preprocessing, "
            "scikit-learn's do not); median of "
            f"{args.repeats} torch runs after a warm-up, {args.sk_repeats} scikit-learn run(s)",
            "",
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(header + rows) + "\n")


if __name__ == "__main__":
    main()
