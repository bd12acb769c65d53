"""benchmarks/reliance.py: pairs read from pipeline run folders, drops, gains and the rank table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reliance_bench", ROOT / "benchmarks" / "reliance.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["reliance_bench"] = module
    spec.loader.exec_module(module)
    return module


def _stage(stage: Path, layer: str, conflicting: float, agreement: float, kl: float, share: float,
           tcav: float, seed: int = 1) -> None:
    """A training folder whose strict checkpoint was already measured on its seed's data (the
    cache the bench reads)."""
    ckpt = stage / "checkpoints" / "epoch_001.ckpt"
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    (stage / "selection.json").write_text(json.dumps({"strict": {"file": str(ckpt)}}))
    out = stage / f"measure_{layer}_seed{seed}"
    out.mkdir()
    (out / "measure.json").write_text(json.dumps({
        "test/acc": conflicting, "test/acc_conflicting": conflicting, "reliance/chance": 0.1,
        "reliance/concept_agreement": agreement, "reliance/ablation_kl": kl,
        "reliance/causal_share_in_bias": share, "tcav": tcav}))


def _run(root: Path, name: str, seed: int, before: tuple[float, ...], after: tuple[float, ...],
         base_of: Path | None = None) -> Path:
    run = root / "fam" / f"{name}_seed{seed}"
    (run / ".hydra").mkdir(parents=True)
    overrides = ["experiment=fam/cd", f"pipeline.seeds=[{seed}]", "model.lambda_o=3"]
    if base_of is not None:
        overrides.append(f"pipeline.base_ckpt={base_of / f'seed{seed}' / 'base' / 'student.pt'}")
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / "pipeline.json").write_text("[]")
    if base_of is None:
        (run / f"seed{seed}").mkdir()
        (run / f"seed{seed}" / "layer_choice.json").write_text(json.dumps({"layer": "pool1"}))
        _stage(run / f"seed{seed}" / "base", "pool1", *before, seed=seed)
    _stage(run / f"seed{seed}" / "cd", "pool1", *after, seed=seed)
    return run


def test_pair_reads_the_cached_measures_of_both_models_at_the_base_models_layer(tmp_path: Path) -> None:
    bench = _bench()
    recipe = _run(tmp_path, "cd", 1, (0.02, 0.9, 3.0, 0.8, 1.0), (0.9, 0.12, 0.06, 0.1, 0.2))
    # A second setting fine-tuned from the recipe run's base model (pipeline.base_ckpt).
    other = _run(tmp_path, "cd_gradient", 1, (), (0.05, 0.88, 2.9, 0.75, 1.0), base_of=recipe)
    assert bench._overrides(recipe) == ["experiment=fam/cd", "model.lambda_o=3"]
    row = bench.pair(recipe, "auto")
    assert row["layer"] == "pool1" and row["gain"] == pytest.approx(88.0)
    assert row["agreement_drop"] == pytest.approx(0.78)
    assert row["agreement_rel_drop"] == pytest.approx(0.78 / 0.8)
    assert row["ablation_kl_rel_drop"] == pytest.approx(0.98)
    row2 = bench.pair(other, "auto")  # its base is the recipe run's base: the same cached measure
    assert row2["agreement_before"] == pytest.approx(0.9) and row2["gain"] == pytest.approx(3.0)
    assert row2["layer"] == "pool1"


def test_relative_drop_is_undefined_where_the_base_model_is_at_chance(tmp_path: Path) -> None:
    bench = _bench()
    row = bench.pair(_run(tmp_path, "cd", 2, (0.9, 0.1, 0.01, 0.05, 0.5), (0.95, 0.1, 0.005, 0.04, 0.9)), "auto")
    assert row["agreement_drop"] == pytest.approx(0.0)
    assert row["agreement_rel_drop"] != row["agreement_rel_drop"]  # NaN
    assert row["tcav_drop"] == pytest.approx(-0.4)


def test_reliance_rule_measures_both_models_at_the_layer_scanned_on_the_base_model(tmp_path: Path) -> None:
    bench = _bench()
    recipe = _run(tmp_path, "cd", 1, (0.02, 0.9, 3.0, 0.8, 1.0), (0.9, 0.12, 0.06, 0.1, 0.2))
    other = _run(tmp_path, "cd_best", 1, (), (0.5, 0.5, 2.0, 0.5, 1.0), base_of=recipe)
    base, after = recipe / "seed1" / "base", other / "seed1" / "cd"
    (base / "reliance_layer_seed1").mkdir()
    (base / "reliance_layer_seed1" / "reliance_layer.json").write_text(json.dumps({"layer": "layer2"}))
    _stage(base, "layer2", 0.02, 0.9, 0.5, 0.3, 1.0)  # the cached measures at the scanned layer
    _stage(after, "layer2", 0.5, 0.5, 0.1, 0.1, 1.0)
    # A measure of the fine-tuned model under its own experiment is not reused for the pair:
    (after / "measure_layer2_seed1" / ".hydra").mkdir()
    (after / "measure_layer2_seed1" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["experiment=fam/cd_best"]))
    assert bench._cache_dir(after, ["experiment=fam/cd", "seed=1"], "layer2") == after / "measure_layer2_seed1_fam-cd"
    assert bench._cache_dir(after, ["experiment=fam/cd_best", "seed=1"], "layer2") == after / "measure_layer2_seed1"
    # A measure on another seed's data (or the config's default seed) is not reused either:
    assert bench._cache_dir(after, ["experiment=fam/cd_best", "seed=2"], "layer2") == after / "measure_layer2_seed2"
    (after / "measure_layer2_seed1_fam-cd").mkdir()
    (after / "measure_layer2_seed1_fam-cd" / "measure.json").write_text(
        (after / "measure_layer2_seed1" / "measure.json").read_text().replace('"reliance/concept_agreement": 0.5',
                                                                              '"reliance/concept_agreement": 0.45'))
    row = bench.pair(other, "reliance")
    assert row["layer"] == "layer2" and row["layer_rule"] == "reliance"
    assert row["ablation_kl_before"] == pytest.approx(0.5) and row["ablation_kl_after"] == pytest.approx(0.1)
    assert row["agreement_after"] == pytest.approx(0.45)  # read from the base experiment's measure
    assert row["agreement_scaled_drop"] == pytest.approx((0.9 - 0.45) / 0.9)
    assert bench.pair(recipe, "auto")["layer"] == "pool1"  # the old rule is still there


def test_table_ranks_each_measures_drop_against_the_gain() -> None:
    bench = _bench()
    rows = []
    for i, gain in enumerate([1.0, 10.0, 40.0, 80.0]):
        row = {"family": "fam", "name": "cd", "seed": i, "layer": "pool1", "chance": 0.1, "gain": gain,
               "conflicting_before": 1.0, "conflicting_after": 1.0 + gain}
        for col, drop in (("agreement", 0.2 * i), ("ablation_kl", 0.1 * i), ("causal_share", 0.1 * i),
                          ("tcav", -0.1 * i)):
            row |= {f"{col}_before": 1.0, f"{col}_after": 1.0 - drop, f"{col}_drop": drop,
                    f"{col}_rel_drop": drop}
        rows.append(row)
    # Chance-scaled drops 0 / 0.5, 0.2 / 0.1, 0.4 / 0.9, 0.6 / 0.9 rank 1, 4, 2, 3 against the gains'
    # 1, 2, 3, 4: Σd² = 6, ρ = 1 − 6·6 / (4·15) = 0.4 (the absolute drop still ranks them perfectly).
    rows[0]["chance"] = 0.5
    rows[1]["chance"] = 0.9
    md = bench.table(rows)
    assert "over 4 pairs" in md
    lines = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in md.splitlines() if line.startswith("| ")}
    assert lines[("agreement", "absolute")].split("|")[3].strip() == "1.00"
    assert lines[("agreement", "chance-scaled (primary)")].split("|")[3].strip() == "0.40"
    assert lines[("tcav (for comparison)", "absolute")].split("|")[3].strip() == "-1.00"
    assert "| fam | cd | 0,1,2,3 | pool1 |" in md
