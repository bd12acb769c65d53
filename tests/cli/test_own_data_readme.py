"""The README's "Use your own data" commands, run as written (between the ``own-data:commands``
markers) on a tiny generated folder dataset, with debug-sized settings appended."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from own_data import write_own_data

ROOT = Path(__file__).resolve().parents[2]
#: Appended to every Hydra command: one batch per stage, one seed.
DEBUG = ["debug=fdr", "pipeline.seeds=[0]", "data.num_workers=0"]


def readme_commands(marker: str = "commands") -> list[list[str]]:
    """The commands of the README block ``own-data:<marker>``, continuation lines joined, comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"<!-- own-data:{marker} -->\n```bash\n(.*?)```\n<!-- /own-data:{marker} -->", text, re.S)
    assert block, f"README lost its own-data:{marker} block"
    joined = block.group(1).replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_readme_block_has_the_three_commands() -> None:
    cmds = [" ".join(c) for c in readme_commands()]
    assert len(cmds) == 4
    assert cmds[0].startswith("python -m cdistill.concepts check my_data/concepts.yaml")
    assert "pipeline.dry_run=true" in cmds[1] and cmds[2].startswith("python pipeline.py experiment=folder/cd")
    assert cmds[3].startswith("python -m cdistill.cli.measure") and "measure.ckpt=runs/cd/seed0/cd" in cmds[3]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable if cmd[0] == "python" else cmd[0], *cmd[1:]]
    if len(argv) > 1 and argv[1] == "pipeline.py":
        argv[1] = str(ROOT / "pipeline.py")
    if any(a.startswith("experiment=") for a in argv):
        argv += DEBUG
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow
@pytest.mark.core  # README's promise to a new user: CI runs it
def test_readme_own_data_commands_run(tmp_path: Path) -> None:
    write_own_data(tmp_path / "my_data")
    for cmd in readme_commands() + readme_commands("scan"):
        res = _run(cmd, tmp_path)
        assert res.returncode == 0, " ".join(cmd) + "\n" + res.stdout[-2000:] + res.stderr[-3000:]
    check = json.loads((tmp_path / "concept_check" / "check.json").read_text())
    assert {s["name"] for s in check["sets"]} == {"bias_0", "bias_1", *(f"random/{i}" for i in range(5))}
    assert (tmp_path / "concept_check" / "bias_0.png").is_file() and (tmp_path / "concept_check" / "random_4.png").is_file()
    dry = (tmp_path / "runs" / "dry" / "dry_run.txt").read_text()
    assert "every check passed" in dry and "bias_0 vs random" in dry
    assert not (tmp_path / "runs" / "dry" / "seed0").exists()  # the dry run trained nothing
    md = (tmp_path / "runs" / "cd" / "pipeline.md").read_text()
    assert "worst (label, bias) group (worst selection)" in md and "bias TCAV score" in md
    per_seed = json.loads((tmp_path / "runs" / "cd" / "pipeline.json").read_text())
    assert "test/acc_worst_group" in per_seed[0]["cd"] and "worst/test/acc_group_mean" in per_seed[0]["base"]
    measured = json.loads((tmp_path / "runs" / "measure" / "measure.json").read_text())
    assert {"test/acc_worst_group", "test/acc_group_mean", "val/acc", "tcav", "tcav_p"} <= set(measured)
    assert 0.0 <= measured["test/acc_worst_group"] <= measured["test/acc_group_mean"] <= 1.0
    gate = (tmp_path / "runs" / "dry_gate" / "dry_run.txt").read_text()
    assert re.search(r"CAV gate on the base model at 'pool1': [12]/2 pairs pass", gate), gate
    scan = json.loads((tmp_path / "concept_check" / "check.json").read_text())["scan"]
    assert {s["layer"] for s in scan} == {"conv1", "relu1", "pool1", "conv2", "relu2", "pool2"} and len(scan) == 12
    for png in ("groups.png", "tcav.png"):
        assert (tmp_path / "runs" / "measure" / png).stat().st_size > 1000
