"""The files and the log table that end a training run (:func:`cdistill.cli.train.train`):
``metrics.json``, ``selection.json`` and the evaluation table."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pytorch_lightning.utilities import rank_zero_only

from cdistill.cli.selection import Selection

log = logging.getLogger(__name__)
#: Per protocol: the file and epoch it tested (``metrics.json`` keeps numbers only).
SELECTION_FILE = "selection.json"


@rank_zero_only
def write_run_report(
    metrics: dict[str, float],
    output_dir: str,
    protocols: Mapping[str, Any],
    selections: Mapping[str, Selection] | None = None,
) -> None:
    """Write ``metrics.json`` (flat, numeric) and ``selection.json`` (per protocol: monitor,
    mode, tested file, score, epoch); print the evaluation table."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    if selections:
        table = {name: asdict(sel) for name, sel in selections.items()}
        (Path(output_dir) / SELECTION_FILE).write_text(json.dumps(table, indent=2))
    prefixes = set(protocols) | {"train"}
    # Evaluation splits: those with an accuracy (classification) or a reflectance error (IID).
    splits = sorted({k.split("/")[0] for k in metrics if k.count("/") == 1 and k.endswith(("/acc", "/r_mse"))} - prefixes)
    iid = [s for s in splits if f"{s}/r_mse" in metrics]  # decomposition runs: errors, not accuracies
    lines: list[str] = []
    classified = [s for s in splits if s not in iid]
    if classified:
        lines += ["", f"{'split':<22}{'acc':>8}{'aligned':>10}{'conflict':>10}"]
    for split in classified:
        row = [metrics.get(f"{split}/{m}") for m in ("acc", "acc_aligned", "acc_conflicting")]
        cells = "".join(f"{'-' if v is None else f'{100 * v:.2f}':>{w}}" for v, w in zip(row, (8, 10, 10), strict=True))
        lines.append(f"{split:<22}{cells}")
    if iid:
        lines += ["", f"{'split':<22}{'R si-MSE':>10}{'S si-MSE':>10}"]
        lines += [f"{s:<22}{metrics[f'{s}/r_mse']:>10.5f}{metrics.get(f'{s}/s_mse', float('nan')):>10.5f}" for s in iid]
    if "train/acc" in metrics:
        lines.append(f"{'train (last epoch)':<22}{100 * metrics['train/acc']:>8.2f}")
    by_protocol = [f"{p} {100 * metrics[f'{p}/test/acc']:.2f}" for p in protocols if f"{p}/test/acc" in metrics]
    if by_protocol:
        lines.append("test acc by model-selection protocol: " + ", ".join(by_protocol))
    for name, sel in (selections or {}).items():
        lines.append(f"  {name}: epoch {sel.epoch}, {sel.file or 'weights in memory after the last epoch'}")
    log.info("\n".join(lines) + f"\nmetrics written to {output_dir}/metrics.json")

