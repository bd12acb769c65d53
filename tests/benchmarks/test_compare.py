"""The comparison command (benchmarks/compare.py): its report from JSONL rows, the count of concept
images DFR's held-out set is matched to, the pooled worst-group validation metric its `worst`
rule selects on, and one real cell end to end (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from cdistill.tasks.classifier import ClassifierModule

ROOT = Path(__file__).resolve().parents[2]


def _compare() -> ModuleType:
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _row(family: str, method: str, seed: int, acc: float | None = None, status: str = "ok",
         oracle: float = 95.0) -> dict[str, object]:
    row: dict[str, object] = {"family": family, "method": method, "seed": seed, "status": status,
                              "wall_s": 10.0 * seed, "oracle_acc": oracle}
    if acc is not None:
        for rule in ("strict", "worst"):
            row |= {f"{rule}/acc": acc, f"{rule}/acc_conflicting": acc - 1, f"{rule}/acc_worst_group": acc - 5}
    return row


def test_report_shows_means_gaps_supervision_and_every_cell_that_did_not_run(tmp_path: Path) -> None:
    cmp = _compare()
    rows = [
        _row("color_mnist", "erm", 1, 5.0), _row("color_mnist", "erm", 2, 15.0),
        _row("color_mnist", "group_dro", 1, 50.0), _row("color_mnist", "group_dro", 2, 60.0),
        _row("color_mnist", "cd", 1, 85.0), _row("color_mnist", "cd", 2, status="failed: CdistillError: bad spec"),
        _row("color_mnist", "dfr_matched", 1, 70.0) | {"concept_images": 1800, "strict/dfr_heldout_size": 960},
        _row("color_mnist", "dfr_matched", 2, status="not run: budget"),
        _row("decoy_mnist", "erm", 1, 96.0, oracle=97.0), _row("decoy_mnist", "cd", 1, 97.0, oracle=97.0),
        # a failed first try, then the rerun that worked: the rerun counts
        _row("decoy_mnist", "group_dro", 1, status="failed: killed"), _row("decoy_mnist", "group_dro", 1, 90.0),
    ]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    md = cmp.write_report(jsonl, tmp_path / "compare.md")
    assert (tmp_path / "compare.md").read_text() == md
    assert (tmp_path / "compare.png").stat().st_size > 1000
    lines = md.splitlines()
    dro = next(ln for ln in lines if ln.startswith("| group_dro | train group labels |"))
    assert "55.0 ± 7.1" in dro and "90.0 ± 0.0" in dro  # mean ± sample std over seeds; the rerun replaced the failure
    assert any(ln.startswith("| cd | concept images | 85.0 ± 0.0 (1/2 seeds; failed)") for ln in lines)
    assert any(ln.startswith("| dfr_matched | val group labels |") and "(1/2 seeds; not run: budget)" in ln for ln in lines)
    # gap closed per seed: cd seed 1 (85 - 5) / (95 - 5) = 89%; DecoyMNIST's ERM is within MIN_GAP of its oracle
    gap_section = md.split("### gap closed to the oracle (strict)")[1].split("###")[0]
    cd_gap = next(ln for ln in gap_section.splitlines() if ln.startswith("| cd |"))
    assert cd_gap.split("|")[3].strip() == "89 ± 0%" and cd_gap.split("|")[4].strip() == "n/a"
    # every cell that did not run is listed with its status, never dropped
    missing = md.split("## Cells that did not run")[1]
    assert "| color_mnist | cd | 2 | failed: CdistillError: bad spec |" in missing
    assert "| color_mnist | dfr_matched | 2 | not run: budget |" in missing
    assert "| decoy_mnist | group_dro | 1 |" not in missing
    matched = next(ln for ln in lines if ln.startswith("| color_mnist | 1800 | 960 |"))
    assert "85.0 ± 0.0" in matched and "70.0 ± 0.0" in matched
    assert "val_reversed" in md and "test split's cue mapping" in md


def test_random_cue_accuracy_is_read_from_the_random_cue_split() -> None:
    cmp = _compare()
    metrics = {f"{r}/{split}/acc": v for r in ("strict", "worst")
               for split, v in (("test", 0.97), ("test_random_color", 0.24), ("test_random_glyph", 0.5))}
    assert cmp.row_from_metrics(metrics, "test_random_color")["strict/acc_random"] == pytest.approx(24.0)
    assert cmp.row_from_metrics(metrics, "test_random_glyph")["worst/acc_random"] == pytest.approx(50.0)
    assert cmp.row_from_metrics(metrics, "test")["strict/acc_random"] == pytest.approx(97.0)  # test is random
    assert cmp.row_from_metrics(metrics, None)["strict/acc_random"] is None  # no such split


def _shapes(tmp_path: Path, twin: bool = True) -> Path:
    from datamodules.shapes_folder import write_shapes_folder

    small = {"n_train": 8, "n_val": 4, "n_val_reversed": 4, "n_test": 4, "concept_images": 5, "image_size": 16}
    root = write_shapes_folder(tmp_path / "shapes", **small)  # type: ignore[arg-type]
    if twin:
        write_shapes_folder(tmp_path / "shapes_unbiased", unbiased=True, **small)  # type: ignore[arg-type]
    return root


def test_each_familys_random_cue_split_is_its_datamodules(tmp_path: Path) -> None:
    cmp = _compare()
    got = {f: cmp.random_cue_split(cmp.parse_family(f))
           for f in ("color_mnist", "marker_mnist", "texture_mnist", "decoy_mnist", "faces")}
    assert got == {"color_mnist": "test_random_color", "marker_mnist": "test_random_glyph", "texture_mnist": "test",
                   "decoy_mnist": None, "faces": "test"}
    root = _shapes(tmp_path, twin=False)
    assert cmp.random_cue_split(cmp.parse_family(f"folder:{root}")) == "test"  # from the folder's data.yaml
    (root / "data.yaml").write_text("num_classes: 4\n")
    own = cmp.parse_family(f"folder:{root}")
    assert cmp.random_cue_split(own) is None  # data=folder's default
    assert cmp.random_cue_split(own, ["data.random_cue_split=test_ood"]) == "test_ood"


def test_a_folder_familys_oracle_is_its_unbiased_twin_or_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cmp = _compare()
    root = _shapes(tmp_path)
    twin = f"data.root={tmp_path}/shapes_unbiased"
    fam = cmp.parse_family(f"folder:{root}")
    settings = ("data.num_classes=4", "data.image_size=16", "data.channels=3", "data.random_cue_split=test")
    assert fam.overrides == (f"data.root={root}", *settings) and fam.oracle == (twin, *settings)
    assert "data.num_classes=4" in cmp.cell_command(fam, "cd", 1, tmp_path, [])
    calls: list[tuple[tuple[object, ...], dict[str, object]]] = []
    monkeypatch.setattr(cmp, "oracle", lambda *a, **kw: calls.append((a, kw)) or {"strict/test/acc": 0.9})
    assert cmp._oracle_acc(fam, 1, tmp_path, ["trainer.max_epochs=1"]) == (pytest.approx(90.0), "ok")
    ((args, kw),) = calls
    assert args[0] == "folder" and twin in args[3] and f"data.root={root}" not in args[3]  # type: ignore[operator]
    assert "trainer.max_epochs=1" in args[3] and kw == {"folder": fam.folder, "unbiased": ()}  # type: ignore[operator]
    assert cmp.parse_family("color_mnist").oracle == ("data.unbiased=true",)
    # without the twin: no oracle, said plainly (even with no budget left), nothing trained
    shutil.rmtree(tmp_path / "shapes_unbiased")
    bare = cmp.parse_family(f"folder:{root}")
    assert bare.oracle is None and cmp._oracle_acc(bare, 1, tmp_path, []) == (None, cmp.NO_ORACLE)
    monkeypatch.setattr(cmp, "random_cue_split", lambda family, extra=(): "test")
    monkeypatch.setattr(cmp, "run_cell", lambda family, method, seed, *a: _row(family.label, method, seed, 50.0))
    rows = cmp.run_all([bare], ["erm", "group_dro"], [1], tmp_path / "runs", tmp_path / "rows.jsonl", [], cmp.Budget(0.0))
    assert len(calls) == 1 and [r["oracle_status"] for r in rows] == [cmp.NO_ORACLE] * 2
    md = cmp.table([*rows, _row("color_mnist", "erm", 1, 10.0), _row("color_mnist", "group_dro", 1, 60.0)])
    gap = next(ln for ln in md.split("### gap closed to the oracle (strict)")[1].splitlines() if ln.startswith("| group_dro |"))
    assert gap.split("|")[3].strip() == cmp.NO_ORACLE and gap.split("|")[4].strip() == "59 ± 0%"


def test_a_method_with_no_seed_run_shows_its_status_not_a_number(tmp_path: Path) -> None:
    cmp = _compare()
    rows = [_row("faces", "erm", 1, 55.0), _row("faces", "lff", 1, status="not run: budget")]
    md = cmp.table(rows)
    assert next(ln for ln in md.splitlines() if ln.startswith("| lff |")).endswith("| not run: budget |")


def test_concept_images_count_each_cue_value_and_the_whole_negative_pool(tmp_path: Path) -> None:
    cmp = _compare()
    terms = [{"concept": "color_{y}", "negative": "grey"}]
    assert cmp.concept_image_count(ROOT / "concepts" / "color_mnist.yaml", terms, 10) == 10 * 150 + 300
    folder = tmp_path / "own"
    for name, n in (("bias_0", 3), ("bias_1", 4), ("random", 6)):
        (folder / name).mkdir(parents=True)
        for i in range(n):
            (folder / name / f"{i}.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    spec = tmp_path / "spec.yaml"
    spec.write_text("sets:\n  bias_{k}: {folder: \"own/bias_{k}\", for_k: 2}\n  random: {folder: own/random, split: 3}\n")
    assert cmp.concept_image_count(spec, [{"concept": "bias_{y}", "negative": "random"}], 2) == 3 + 4 + 6
    with pytest.raises(KeyError, match="grey"):
        cmp.concept_image_count(spec, [{"concept": "bias_{y}", "negative": "grey"}], 2)


def test_cell_commands_share_the_erm_base_and_select_by_both_rules(tmp_path: Path) -> None:
    cmp = _compare()
    fam = cmp.parse_family("marker_mnist")
    cd = cmp.cell_command(fam, "rrclarc", 2, tmp_path, ["trainer.max_epochs=1"])
    assert cd[0] == "pipeline.py" and "model=rrclarc_gray" in cd
    assert f"pipeline.base_ckpt={tmp_path}/marker_mnist/erm_seed2/student.pt" in cd
    dfr = cmp.cell_command(fam, "dfr_matched", 2, tmp_path, [], heldout=1800)
    assert "method=dfr" in dfr and "model.dfr.heldout_size=1800" in dfr
    for argv in (cd, dfr):
        assert "++protocols.strict=val/acc" in argv and "++protocols.worst=val_all/acc_worst_group" in argv
    own = cmp.parse_family(f"folder:{tmp_path}/data:{tmp_path}/spec.yaml")
    argv = cmp.cell_command(own, "cd", 1, tmp_path, [])
    assert f"data.root={tmp_path}/data" in argv and f"model.concepts.spec={tmp_path}/spec.yaml" in argv
    assert "model.concepts.spec" not in " ".join(cmp.cell_command(own, "erm", 1, tmp_path, []))


def test_a_failed_cell_keeps_the_error_line_not_hydras_hint() -> None:
    cmp = _compare()
    hint = "\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.\n"
    assert cmp._reason("Traceback\n  File x\ncdistill.errors.CdistillError: no spec\n" + hint) == \
        "cdistill.errors.CdistillError: no spec"
    assert cmp._reason("Could not override 'k'.\nKey 'k' is not in struct\n" + hint) == \
        "Could not override 'k'. / Key 'k' is not in struct"


def test_read_only_reports_a_failed_cell_as_failed_with_its_reason(tmp_path: Path) -> None:
    cmp = _compare()
    fam = cmp.parse_family("color_mnist")
    failed = cmp.cell_dir(tmp_path, fam, "rrclarc", 1)
    failed.mkdir(parents=True)
    (failed / "compare.log").write_text("fitting\nError: Every CAV fell below the accuracy gate\n(HYDRA_FULL_ERROR=1 for the full trace)\n")
    budget = cmp.Budget(None, read_only=True)
    row = cmp.run_cell(fam, "rrclarc", 1, tmp_path, [], budget, erm_status="ok")
    assert row["status"].startswith("failed: Error: Every CAV fell below the accuracy gate (log: ")
    pending = cmp.run_cell(fam, "rrclarc", 2, tmp_path, [], budget, erm_status="ok")  # no log: never ended
    assert pending["status"] == "not run: not finished yet (--read-only)"


def test_val_all_worst_group_pools_the_validation_splits() -> None:
    """ColorMNIST's val holds only aligned groups and val_reversed only conflicting ones: the
    pooled worst group is the lower of the two; test splits are not pooled."""
    module = ClassifierModule(student={"name": "mnist_cnn", "num_classes": 10, "in_chans": 3},
                              optimizer={"_target_": "torch.optim.Adam", "lr": 1e-3})
    labels = torch.arange(10)
    logged: dict[str, float] = {}
    module.log_dict = lambda values, **kw: logged.update({k: float(v) for k, v in values.items()})  # type: ignore[method-assign]
    names = module.hparams["val_names"]
    for idx, (bias, right) in enumerate(((labels, True), (9 - labels, False))):  # val right, val_reversed wrong
        preds = labels if right else (labels + 1) % 10
        module.forward = lambda x, preds=preds: F.one_hot(preds, 10).float()  # type: ignore[method-assign,misc]
        module._eval_step({"image": torch.zeros(10, 3, 28, 28), "label": labels, "bias": bias}, names, idx)
    module._eval_epoch_end(names)
    assert logged["val/acc_worst_group"] == 1.0 and logged["val_reversed/acc_worst_group"] == 0.0
    assert logged["val_all/acc_worst_group"] == 0.0 and logged["val_all/acc_group_mean"] == 0.5
    logged.clear()
    tests = module.hparams["test_names"]
    module._eval_step({"image": torch.zeros(10, 3, 28, 28), "label": labels, "bias": labels}, tests, 0)
    module._eval_epoch_end(tests)
    assert "test/acc_worst_group" in logged and not any(k.startswith("val_all/") for k in logged)


@pytest.mark.slow
def test_one_real_cell_end_to_end(tmp_path: Path) -> None:
    """ERM, DFR and the oracle on ColorMNIST for one tiny epoch: rows, run folders, cache, report."""
    small = ["data.max_train_samples=200", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
             "trainer.enable_progress_bar=false"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--families", "color_mnist", "--methods", "dfr",
           "--seeds", "1", "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "rows.jsonl"), "--", *small]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(ln) for ln in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [(r["method"], r["status"]) for r in rows] == [("erm", "ok"), ("dfr", "ok")]
    for r in rows:
        for rule in ("strict", "worst"):
            assert 0.0 <= r[f"{rule}/acc"] <= 100.0 and r[f"{rule}/acc_worst_group"] <= r[f"{rule}/acc"]
        assert r["oracle_acc"] is not None and r["wall_s"] > 0 and r["cpu_s"] > 0
    assert rows[1]["strict/dfr_heldout_size"] > 0
    selection = json.loads((tmp_path / "runs" / "color_mnist" / "dfr_seed1" / "selection.json").read_text())
    assert selection["worst"]["monitor"] == "val_all/acc_worst_group"
    assert "| dfr | val group labels |" in (tmp_path / "compare.md").read_text()
    # a second call reads the finished cells instead of training them again
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    again = [json.loads(ln) for ln in (tmp_path / "rows.jsonl").read_text().splitlines()][2:]
    assert [r.get("cached") for r in again] == [True, True]
    assert [r["cpu_s"] for r in again] == [r["cpu_s"] for r in rows]  # the cell's timing travels with its cache
    assert again[1]["strict/acc"] == rows[1]["strict/acc"]
