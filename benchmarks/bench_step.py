"""Step time of the concept-distilled training step over the plain step (same model, batch).

    python benchmarks/bench_step.py --batch-size 64 --steps 30 --threads 2 [--device cuda]

A "step" is forward + loss + backward + Adam update, as in training. Targets: prototype form
<= 1.15x the plain step, logit form <= 2x (issue 3); an erasure hook <= 1.05x (issue 5).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import torch

from cdistill.tasks.classifier import ClassifierModule
from cdistill.tasks.distill import ConceptDistillModule
from datamodules import ColorMNISTDataModule

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "prototype form": {"lambda_c": 1.0, "form": "prototype"},
    "logit form": {"lambda_c": 1.0, "form": "logit"},
    "prototype form + L": {"lambda_c": 1.0, "form": "prototype", "lambda_l": 1.0},
    "prototype loss only": {"lambda_c": 0.0, "lambda_p": 1.0},
    # Erasure hooks alone (issue 5 target: <= 1.05x): LEACE of the 10 colour classes.
    "LEACE hook, conv1 per position": {"lambda_c": 0.0, "erasure": {"layers": ["conv1"], "mode": "position"}},
    "LEACE hook, conv2 per position": {"lambda_c": 0.0, "erasure": {"layers": ["conv2"], "mode": "position"}},
    "LEACE hook, conv2 flattened": {"lambda_c": 0.0, "erasure": {"layers": ["conv2"], "mode": "flatten"}},
}


def build(variant: dict[str, Any], layer: str) -> ClassifierModule:
    common: dict[str, Any] = {"student": {"name": "mnist_cnn"}, "optimizer": {"_target_": "torch.optim.Adam", "lr": 1e-3}}
    if not variant:
        return ClassifierModule(**common)
    concepts = {"spec": "concepts/color_mnist.yaml", "terms": [{"concept": "color_{y}", "negative": "grey"}], "min_accuracy": 0.0}
    return ConceptDistillModule(layer=layer, concepts=concepts, **variant, **common)


def time_steps(
    module: ClassifierModule, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], steps: int, device: torch.device
) -> list[float]:
    times = []
    for i in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        module.compute_losses(batch)["loss"].backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # warm-up
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layer", default="conv2")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dm = ColorMNISTDataModule(max_train_samples=1000)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    batch = {k: v[: args.batch_size].to(device) for k, v in batch.items()}
    print(f"# step time, batch {args.batch_size}, layer {args.layer}, {args.steps} steps, "
          f"threads {torch.get_num_threads()}, device {device}, {platform.processor() or platform.machine()}")
    modules = {}
    for name, variant in VARIANTS.items():
        module = build(variant, args.layer).to(device)
        if isinstance(module, ConceptDistillModule):
            module.fit_artefacts(dm)
        modules[name] = (module, torch.optim.Adam(module.parameters(), lr=1e-3))
    # Round-robin over variants so that machine noise and warm-up hit all of them alike.
    times: dict[str, list[float]] = {name: [] for name in modules}
    for _ in range(args.rounds):
        for name, (module, opt) in modules.items():
            times[name] += time_steps(module, opt, batch, args.steps // args.rounds, device)
    print("| variant | median ms | ratio to plain |\n|---|---|---|")
    base = statistics.median(times["plain"]) * 1000
    for name, ts in times.items():
        med = statistics.median(ts) * 1000
        print(f"| {name} | {med:.2f} | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
