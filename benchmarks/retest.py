"""Re-derive published test figures from the checkpoints they name.

    python benchmarks/retest.py logs/<task>/runs/<run>/checkpoints/paper/best.ckpt
    python benchmarks/retest.py --selection logs/<run>/seed1/cd/selection.json

Each checkpoint carries the resolved Hydra config of its run (``checkpoint["cdistill"]
["config"]``). The script rebuilds that run's datamodule and LightningModule from it, loads the
checkpoint's weights and buffers (``weights_only=True``: CAVs, prototypes and erasers included)
and tests them on the run's test splits. With ``--selection`` it tests every protocol's file
listed in a run's ``selection.json`` (``checkpoints/last.ckpt`` for the last epoch) and compares each figure with the run's ``metrics.json``
beside it (exit status 1 when one differs by more than ``--tol``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cdistill.errors import CdistillError  # noqa: E402
from cdistill.train import instantiate  # noqa: E402


def retest(ckpt_path: str | Path) -> dict[str, float]:
    """Test the weights of one checkpoint on its own run's test splits.

    Args:
        ckpt_path: A Lightning checkpoint written by cdistill (it holds the run's config).

    Returns:
        ``{"test/acc": ..., ...}``: every ``test...`` metric the module logs.
    """
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    config = ckpt.get("cdistill", {}).get("config")
    if not config:
        raise CdistillError(f"{ckpt_path} holds no run config (written by another tool or an old cdistill).")
    cfg = OmegaConf.create(config)
    pl.seed_everything(int(cfg.get("seed") or 0), verbose=False)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    model.load_state_dict(ckpt["state_dict"], strict=model.strict_loading)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.test(model, datamodule=datamodule, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test")}


def check_selection(selection_file: Path, tol: float) -> bool:
    """Retest each protocol's file of ``selection.json``; compare with ``metrics.json``."""
    selections: dict[str, Any] = json.loads(selection_file.read_text())
    reported: dict[str, float] = json.loads((selection_file.parent / "metrics.json").read_text())
    ok = True
    for name, sel in selections.items():
        file = sel.get("file")
        if not file:  # the weights in memory after the last epoch: what last.ckpt holds
            last = selection_file.parent / "checkpoints" / "last.ckpt"
            if not last.is_file():
                print(f"{name}: weights in memory after the last epoch, and no last.ckpt to retest")
                continue
            file = str(last)
        fresh = retest(file)
        for key in ("test/acc", "test/acc_conflicting"):
            if key not in fresh:
                continue
            old = reported.get(f"{name}/{key}")
            same = old is not None and abs(old - fresh[key]) <= tol
            ok &= same
            print(f"{name}/{key}: reported {old}, fresh test of {file} (epoch {sel['epoch']}): "
                  f"{fresh[key]} {'ok' if same else 'DIFFERS'}")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="*", help="checkpoint files to test")
    ap.add_argument("--selection", nargs="*", default=[], type=Path, help="selection.json files to check")
    ap.add_argument("--tol", type=float, default=1e-6, help="largest accepted difference (fraction)")
    args = ap.parse_args()
    for path in args.checkpoints:
        print(path, json.dumps(retest(path), indent=1, sort_keys=True))
    ok = all([check_selection(f, args.tol) for f in args.selection])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
