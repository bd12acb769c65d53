"""Benchmark causal basis extraction on a ResNet-18 (random weights) at ``layer4``.

Defaults: 1,000 random inputs at 64 px in batches of 100, k = 8, mean ablation, position
space (d = 512 channels). Prints the wall time, the number of function evaluations (passes
over all inputs: the reference pass, then each L-BFGS loss-and-gradient and each final energy)
and the energies. By default every evaluation runs only the part of the network after the
layer on its cached output (the tail replay, ``tail=True``); ``--no-tail`` runs the whole model
per evaluation, ``--compare`` runs both on the same inputs and prints the differences::

    python benchmarks/bench_causal.py                     # full size, tail replay
    python benchmarks/bench_causal.py --n 100 --k 2       # smoke test
    python benchmarks/bench_causal.py --no-tail           # the full forward per evaluation
    python benchmarks/bench_causal.py --compare --n 200   # both paths, side by side
    python benchmarks/bench_causal.py --device cuda

Random inputs of a random network only time the method; the energies carry no meaning beyond
being positive and descending.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdistill.causal import CausalBasis, extract_causal_bases
from cdistill.causal.energy import Energy


class _Counts:
    """Counts the energy evaluations (each is one pass over all inputs) by wrapping the methods."""

    def __init__(self) -> None:
        self.loss_and_grad = 0
        self.energy = 0
        energy_class = Energy
        self._originals = (energy_class.loss_and_grad, energy_class.energy)

        def loss_and_grad(obj: Any, *args: Any) -> Tensor:
            self.loss_and_grad += 1
            return self._originals[0](obj, *args)

        def energy(obj: Any, *args: Any) -> Tensor:
            self.energy += 1
            return self._originals[1](obj, *args)

        energy_class.loss_and_grad = loss_and_grad  # type: ignore[method-assign]
        energy_class.energy = energy  # type: ignore[method-assign]

    def restore(self) -> None:
        Energy.loss_and_grad, Energy.energy = self._originals  # type: ignore[method-assign]


def _run(model: nn.Module, batches: list[Tensor], args: argparse.Namespace, tail: bool) -> CausalBasis:
    counts = _Counts()
    start = time.perf_counter()
    try:
        result = extract_causal_bases(
            model, args.layer, batches, args.k, mode=args.mode, max_iter=args.max_iter,
            progress=True, tail=tail,
        )[args.layer]
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    finally:
        counts.restore()
    wall = time.perf_counter() - start
    passes = 1 + counts.loss_and_grad + counts.energy
    path = "tail replay" if tail else "full forward"
    print(f"[{path}] wall time: {wall:.1f} s, {passes} passes over the inputs (1 reference, "
          f"{counts.loss_and_grad} loss-and-gradient, {counts.energy} energy; "
          f"{wall / passes:.3f} s per pass), basis {tuple(result.basis.shape)}")
    print(f"[{path}] energies:", " ".join(f"{e:.4g}" for e in result.energies.tolist()))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="number of inputs")
    parser.add_argument("--batch", type=int, default=100, help="batch size")
    parser.add_argument("--size", type=int, default=64, help="image size (px)")
    parser.add_argument("--k", type=int, default=8, help="directions to extract")
    parser.add_argument("--layer", default="layer4")
    parser.add_argument("--mode", default="mean", choices=("mean", "zero", "resample"))
    parser.add_argument("--max-iter", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    paths = parser.add_mutually_exclusive_group()
    paths.add_argument("--no-tail", action="store_true", help="run the whole model per evaluation")
    paths.add_argument("--compare", action="store_true", help="run the tail replay, then the full forward")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(weights=None).to(args.device)
    g = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn(args.n, 3, args.size, args.size, generator=g)
    batches = list(inputs.split(args.batch))
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    print(f"resnet18 {args.layer}, n={args.n} ({len(batches)} batches of <= {args.batch}), "
          f"{args.size} px, k={args.k}, mode={args.mode}, max_iter={args.max_iter}")
    tails = [False] if args.no_tail else [True, False] if args.compare else [True]
    results = [_run(model, batches, args, tail) for tail in tails]
    if len(results) == 2:
        a, b = results
        cosines = (a.basis * b.basis).sum(0).abs()
        print(f"tail vs full: max |energy gap| {float((a.energies - b.energies).abs().max()):.3g} "
              f"(relative {float(((a.energies - b.energies) / b.energies).abs().max()):.3g}), "
              f"max |basis gap| {float((a.basis - b.basis).abs().max()):.3g}, "
              f"min |cos| of matching columns {float(cosines.min()):.6f}")


if __name__ == "__main__":
    main()
