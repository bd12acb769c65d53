"""The pipeline's summary: numeric CSV (mean and std apart, a unit per row), p-values in
scientific notation, one unit per markdown table, and the summary as logger metrics."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from cdistill.cli.pipeline import summarize, summary_metrics, write_report

PROTOCOLS = ["strict", "paper"]


def _seed(acc: float, p: float, tcav: float) -> dict[str, Any]:
    base = {"strict/test/acc": 0.02, "paper/test/acc": 0.03, "val/acc": 0.99, "tcav": 0.9, "tcav_p": 1e-3,
            "tcav_significant": 1.0}
    cd = {"strict/test/acc": acc - 0.1, "paper/test/acc": acc, "val/acc": 0.98, "tcav": tcav, "tcav_p": p,
          "tcav_significant": 0.5}
    return {"seed": 0, "base": base, "cd": cd}


PER_SEED = [_seed(0.60, 6.7e-05, 0.40), _seed(0.70, 8.7e-05, 0.50)]


def _write(tmp_path: Path) -> tuple[str, list[dict[str, str]]]:
    rows = summarize(PER_SEED, PROTOCOLS)
    text = write_report(rows, PER_SEED, tmp_path, "t")
    with (tmp_path / "pipeline.csv").open() as f:
        return text, list(csv.DictReader(f))


def test_csv_is_numeric_with_mean_and_std_apart(tmp_path: Path) -> None:
    _, rows = _write(tmp_path)
    by_key = {r["key"]: r for r in rows}
    paper = by_key["paper/test/acc"]
    assert paper["unit"] == "%" and paper["n_seeds"] == "2"
    assert float(paper["cd_mean"]) == pytest.approx(65.0) and float(paper["cd_std"]) == pytest.approx(7.0711, abs=1e-3)
    p = by_key["tcav_p"]
    assert p["unit"] == "p-value" and float(p["cd_mean"]) == pytest.approx(7.7e-05)
    assert by_key["tcav"]["unit"] == "fraction" and float(by_key["tcav"]["cd_mean"]) == pytest.approx(0.45)


def test_p_values_print_in_scientific_notation(tmp_path: Path) -> None:
    text, _ = _write(tmp_path)
    (line,) = [ln for ln in text.splitlines() if ln.startswith("| bias TCAV p")]
    assert "7.70e-05 ± 1.41e-05" in line and "0.00 ± 0.00" not in line


def test_one_unit_per_table(tmp_path: Path) -> None:
    text, _ = _write(tmp_path)
    tables: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("| metric"):
            tables.append([])
        elif line.startswith("| ") and tables:
            tables[-1].append(line)
    assert len(tables) == 2
    accuracy, tcav = tables
    assert all("acc" in ln and "TCAV" not in ln for ln in accuracy)  # percent only
    assert all("TCAV" in ln for ln in tcav) and len(tcav) == 3


def test_summary_metrics_carry_the_sweep_objective() -> None:
    metrics = summary_metrics(summarize(PER_SEED, PROTOCOLS))
    assert metrics["cd/paper/test/acc"] == pytest.approx(0.65)  # same scale as metrics.json
    assert metrics["cd/paper/test/acc_std"] == pytest.approx(0.070711, abs=1e-5)
    assert metrics["cd/tcav_p"] == pytest.approx(7.7e-05) and metrics["base/tcav"] == pytest.approx(0.9)


def test_worst_group_rows_and_the_worst_protocol_reach_the_table(tmp_path: Path) -> None:
    seed = {"seed": 0,
            "base": {"worst/test/acc": 0.7, "worst/test/acc_worst_group": 0.25, "worst/test/acc_group_mean": 0.6},
            "cd": {"worst/test/acc": 0.8, "worst/test/acc_worst_group": 0.5, "worst/test/acc_group_mean": 0.7}}
    rows = summarize([seed], ["worst"])
    by_key = {r["key"]: r for r in rows}
    assert by_key["worst/test/acc_worst_group"]["base_mean"] == pytest.approx(25.0)
    assert by_key["worst/test/acc_group_mean"]["cd_mean"] == pytest.approx(70.0)
    text = write_report(rows, [seed], tmp_path, "t")
    assert "worst (label, bias) group (worst selection)" in text
