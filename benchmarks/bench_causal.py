"""Benchmark causal basis extraction on a ResNet-18 (random weights) at ``layer4``.

Defaults: 1,000 random inputs at 64 px in batches of 100, k = 8, mean ablation, position
space (d = 512 channels). Prints the wall time, the number of function evaluations (forward +
backward passes over all inputs) and the energies::

    python benchmarks/bench_causal.py                     # full size
    python benchmarks/bench_causal.py --n 100 --k 2       # smoke test
    python benchmarks/bench_causal.py --device cuda

Random inputs of a random network only time the method; the energies carry no meaning beyond
being positive and descending.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cdistill.causal import extract_causal_bases


class _Counting(nn.Module):
    """Counts the forward passes of the wrapped model."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x: Tensor) -> Any:
        self.calls += 1
        return self.inner(x)


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
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model = torchvision.models.resnet18(weights=None).to(args.device)
    counting = _Counting(model)
    g = torch.Generator().manual_seed(args.seed)
    inputs = torch.randn(args.n, 3, args.size, args.size, generator=g)
    batches = list(inputs.split(args.batch))
    start = time.perf_counter()
    result = extract_causal_bases(
        counting, f"inner.{args.layer}", batches, args.k, mode=args.mode,
        max_iter=args.max_iter, progress=True,
    )[f"inner.{args.layer}"]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    passes = counting.calls / len(batches)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, device {args.device}")
    print(f"resnet18 {args.layer}, n={args.n} ({len(batches)} batches of <= {args.batch}), "
          f"{args.size} px, k={args.k}, mode={args.mode}, space={result.space}")
    print(f"wall time: {wall:.1f} s, {passes:.0f} passes over the inputs "
          f"({wall / max(passes, 1):.2f} s per pass), basis {tuple(result.basis.shape)}")
    print("energies:", " ".join(f"{e:.4g}" for e in result.energies.tolist()))


if __name__ == "__main__":
    main()
