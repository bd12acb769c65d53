"""Benchmark linear concept erasure: build time, streaming accuracy, method comparison.

Run once, side by side, in one process (same torch threads for every contender)::

    python benchmarks/bench_erasure.py            # full run (a few minutes on 2 cores)
    python benchmarks/bench_erasure.py --quick    # small sizes, smoke test

Sections:
1. LEACE eraser build time at d = 4096: cdistill vs the ``concept-erasure`` package.
2. Streaming statistics from float32 inputs with a 1e4 offset, relative error against a
   float64 two-pass covariance (cdistill and the reference).
3. LEACE vs orth vs INLP vs RLACE vs P-ClArC at d = 300, n = 4000: fit time, held-out
   accuracy of a fresh scikit-learn probe after erasure, and mean squared edit.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdistill.erasure import LeaceFitter, fit_eraser

F64 = torch.float64


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def two_pass(x: Tensor, zf: Tensor) -> tuple[Tensor, Tensor]:
    x, zf = x.to(F64), zf.to(F64)
    xc, zc = x - x.mean(0), zf - zf.mean(0)
    n = x.shape[0]
    return xc.T @ xc / (n - 1), xc.T @ zc / (n - 1)


def classes(n: int, d: int, k: int, *, seed: int, offset: float = 0.0) -> tuple[Tensor, Tensor]:
    """Correlated Gaussian classes (float32): x = noise @ mixing + class mean + offset."""
    fixed = torch.Generator().manual_seed(1234 + d)
    mixing = torch.randn(d, d, generator=fixed) / d**0.5 + torch.eye(d)
    means = 0.5 * torch.randn(k, d, generator=fixed) / d**0.25
    g = torch.Generator().manual_seed(seed)
    z = torch.randint(0, k, (n,), generator=g)
    x = torch.randn(n, d, generator=g) @ mixing + means[z] + offset
    return x, z


# ---- 1. build time ---------------------------------------------------------------------------


def bench_build(d: int, n: int, k: int, repeats: int) -> None:
    import concept_erasure as ce

    print(f"\n## 1. LEACE eraser build time (d = {d}, n = {n}, k = {k} classes, float64 stats)\n")
    x, z = classes(n, d, k, seed=0)
    onehot = torch.nn.functional.one_hot(z, k)

    ours = LeaceFitter(d, num_classes=k)
    _, t_upd = timed(lambda: ours.update(x, z))
    ref = ce.LeaceFitter(d, k, dtype=F64, shrinkage=False, svd_tol=1e-12)
    _, t_upd_ref = timed(lambda: ref.update(x, onehot))
    ref_default = ce.LeaceFitter(d, k, dtype=F64)  # shrinkage=True, svd_tol=0.01 (absolute)
    ref_default.update(x, onehot)
    print(
        f"statistics update (one batch of {n}): cdistill {t_upd:.2f} s, reference {t_upd_ref:.2f} s\n"
    )

    rows: list[tuple[str, float]] = []

    def best(fn: Callable[[], Any]) -> tuple[Any, float]:
        results = [timed(fn) for _ in range(repeats)]
        return results[0][0], min(t for _, t in results)

    e_ours, t_ours = best(ours.build)
    rows.append(("cdistill `build()` (auto -> Cholesky path)", t_ours))
    ours_shrink = LeaceFitter(d, num_classes=k, shrinkage=True)
    ours_shrink.merge_(ours)
    _, t_shrink = best(ours_shrink.build)
    rows.append(("cdistill `build()`, shrinkage=True (OAS)", t_shrink))
    ours_eigh = LeaceFitter(d, num_classes=k, whitening="eigh")
    ours_eigh.merge_(ours)
    e_eigh, t_eigh = best(ours_eigh.build)
    rows.append(("cdistill `build()`, whitening='eigh' (one eigh + O(d^2 k))", t_eigh))
    e_ref, t_ref = best(lambda: ref.eraser)
    rows.append(("concept-erasure `.eraser`, shrinkage=False", t_ref))
    _, t_ref_def = best(lambda: ref_default.eraser)
    rows.append(("concept-erasure `.eraser`, defaults (shrinkage=True)", t_ref_def))

    print(f"| build | seconds (best of {repeats}) | speed-up vs reference (shrinkage=False) |")
    print("|---|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.2f} | {t_ref / t:.1f}x |")
    p_ref = torch.eye(d, dtype=F64) - e_ref.P
    print(
        f"\nagreement: ||P_ours - P_ref||_F / ||P_ref||_F = {rel(e_ours.projection(), p_ref):.2e} "
        f"(Cholesky path), {rel(e_eigh.projection(), p_ref):.2e} (eigh path); rank {e_ours.rank}"
    )


# ---- 2. streaming accuracy -------------------------------------------------------------------


def bench_streaming(d: int, n: int, chunk: int, offset: float) -> None:
    import concept_erasure as ce

    print(
        f"\n## 2. Streaming statistics: float32 inputs + {offset:g} offset (d = {d}, n = {n}, chunks of {chunk})\n"
    )
    k = 4
    x, z = classes(n, d, k, seed=1, offset=offset)
    onehot = torch.nn.functional.one_hot(z, k)
    sxx, sxz = two_pass(x.double(), onehot)
    contenders: list[tuple[str, Any]] = [
        ("cdistill LeaceFitter (float64 shifted sums)", LeaceFitter(d, num_classes=k)),
        ("concept-erasure LeaceFitter, dtype=float64", ce.LeaceFitter(d, k, dtype=F64)),
        (
            "concept-erasure LeaceFitter, dtype=float32 (input dtype)",
            ce.LeaceFitter(d, k, dtype=torch.float32),
        ),
    ]
    print("| statistics | rel. error Sigma_xx | rel. error Sigma_xz |")
    print("|---|---|---|")
    for name, fitter in contenders:
        for a in range(0, n, chunk):
            zz = z[a : a + chunk] if isinstance(fitter, LeaceFitter) else onehot[a : a + chunk]
            fitter.update(x[a : a + chunk], zz)
        if isinstance(fitter, LeaceFitter):
            cxx, cxz = fitter.sigma_xx(), fitter.sigma_xz()
        else:
            cxx, cxz = fitter.sigma_xx.double(), fitter.sigma_xz.double()
        print(f"| {name} | {rel(cxx, sxx):.2e} | {rel(cxz, sxz):.2e} |")
    print("\n(reference = float64 two-pass covariance of the same float32 data)")


# ---- 3. method comparison --------------------------------------------------------------------


def bench_methods(d: int, n: int, rlace_steps: int) -> None:
    from sklearn.linear_model import LogisticRegression

    print(f"\n## 3. Erasure methods, binary concept (d = {d}, n = {n} train + {n} held-out)\n")
    x, z = classes(2 * n, d, 2, seed=2)
    x = x.double()
    xtr, ztr, xte, zte = x[:n], z[:n], x[n:], z[n:]
    chance = float(torch.bincount(zte).max()) / len(zte)

    def probe_acc(xa: Tensor, xb: Tensor) -> float:
        clf = LogisticRegression(max_iter=2000).fit(xa.numpy(), ztr.numpy())
        return float(clf.score(xb.numpy(), zte.numpy()))

    print(
        f"chance (majority rate of the held-out split) = {chance:.4f}; "
        f"binomial 2-sigma = +-{2 * (chance * (1 - chance) / n) ** 0.5:.4f}\n"
    )
    print("| method | fit time (s) | rank | probe acc. after erasure (held-out) | mean sq. edit |")
    print("|---|---|---|---|---|")
    print(f"| none | - | 0 | {probe_acc(xtr, xte):.4f} | 0 |")
    configs: list[tuple[str, str, dict[str, Any]]] = [
        ("LEACE", "leace", {"num_classes": 2}),
        ("orth (LEACE without whitening)", "orth", {"num_classes": 2}),
        ("INLP (<= 20 rounds)", "inlp", {"n_iter": 20}),
        (f"RLACE (rank 1, {rlace_steps} steps)", "rlace", {"rank": 1, "n_steps": rlace_steps}),
        ("P-ClArC (mean-difference CAV)", "p-clarc", {}),
    ]
    for label, method, kwargs in configs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            eraser = fit_eraser(method, xtr, ztr, **kwargs)
            t = time.perf_counter() - start
        with torch.no_grad():
            etr, ete = eraser(xtr), eraser(xte)
        edit = float((etr - xtr).pow(2).sum(1).mean())
        print(f"| {label} | {t:.2f} | {eraser.rank} | {probe_acc(etr, ete):.4f} | {edit:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--build-dim", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=1, help="build repeats (best time kept)")
    parser.add_argument("--rlace-steps", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["build", "streaming", "methods"])
    args = parser.parse_args()
    if args.quick:
        args.build_dim, args.rlace_steps = 512, 200
    if args.threads:
        torch.set_num_threads(args.threads)  # one setting for every contender

    print("# cdistill erasure benchmark\n")
    print(
        f"- torch {torch.__version__}, threads = {torch.get_num_threads()}, "
        f"cpus = {os.cpu_count()}, cuda = {torch.cuda.is_available()}"
    )
    print(
        f"- python {platform.python_version()}, {platform.machine()}, "
        f"load average at start = {os.getloadavg()[0]:.2f}"
    )
    try:
        import concept_erasure

        print(
            f"- concept-erasure {getattr(concept_erasure, '__version__', '0.2.4 (no __version__)')}"
        )
    except ImportError:
        print("- concept-erasure not installed: sections 1 and 2 skipped")
        args.skip += ["build", "streaming"]

    start = time.perf_counter()
    if "build" not in args.skip:
        bench_build(args.build_dim, 2 * args.build_dim, 10, args.repeats)
    if "streaming" not in args.skip:
        bench_streaming(64, 20_000 if args.quick else 200_000, 1000, 1e4)
    if "methods" not in args.skip:
        bench_methods(64 if args.quick else 300, 1000 if args.quick else 4000, args.rlace_steps)
    print(
        f"\ntotal {time.perf_counter() - start:.0f} s; load average at end = {os.getloadavg()[0]:.2f}"
    )


if __name__ == "__main__":
    main()
