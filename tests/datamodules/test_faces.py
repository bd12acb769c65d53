"""Faces: the BFFHQ reader on a fixture in the released layout, its errors, the drawn proxy and
the faces experiments (fast_dev_run, DDP on 2 CPU processes)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig
from PIL import Image

from cdistill.cli.train import train
from cdistill.concepts import load_spec
from cdistill.errors import CdistillError
from datamodules import BFFHQDataModule, FacesProxyDataModule, create_datamodule
from datamodules.faces_proxy import MARKER, ProxySettings, ensure_faces_proxy

ROOT = Path(__file__).resolve().parents[2]
MakeCfg = Callable[..., DictConfig]
#: A proxy small enough for a test: 400 train faces (2 conflicting), 32 px.
TINY = ["data.n_train=400", "data.n_valid=16", "data.n_test=16", "data.proxy_size=32", "data.image_size=32"]


def _png(path: Path, value: int, size: tuple[int, int] = (12, 12), mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1}[mode]
    arr = np.full((size[1], size[0], channels), value, np.uint8).squeeze()
    Image.fromarray(arr, mode=mode).save(path)


def write_fixture(root: Path, pct: str = "0.5pct") -> Path:
    """A tiny BFFHQ in the released layout: train 8 aligned + 2 conflicting, valid 2 + 2,
    test 3 aligned + 3 conflicting. Pixel value = 10 * index, to trace files to samples."""
    i = 0
    for kind, pairs in (("align", [(0, 0)] * 4 + [(1, 1)] * 4), ("conflict", [(0, 1), (1, 0)])):
        for age, gender in pairs:
            _png(root / pct / kind / str(age) / f"{i:05d}_{age}_{gender}.png", 10 * i)
            i += 1
    for split, pairs in (("valid", [(0, 0), (1, 1), (0, 1), (1, 0)]),
                         ("test", [(0, 0), (1, 1), (1, 1), (0, 1), (1, 0), (1, 0)])):
        for age, gender in pairs:
            _png(root / split / f"{i:05d}_{age}_{gender}.png", 10 * i)
            i += 1
    _png(root / "test" / "grey_0_0.png", 5, mode="L")  # a grey file is converted to RGB
    return root


# --------------------------------------------------------------------------- reader


def test_reader_parses_layout_splits_and_groups(tmp_path: Path) -> None:
    dm = BFFHQDataModule(root=str(write_fixture(tmp_path)), image_size=16)
    assert dm.split_names == ["train", "val", "val_reversed", "test"]
    train_ds, val, rev, test = (dm.split(s) for s in dm.split_names)
    assert len(train_ds) == 10 and int((train_ds.bias != train_ds.labels).sum()) == 2
    assert train_ds.labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 1]  # align/0, align/1, conflict/0, conflict/1
    assert (len(val), len(rev)) == (4, 2)
    assert bool((rev.bias != rev.labels).all())  # val_reversed = the conflicting part of valid
    assert (len(test), int((test.bias == test.labels).sum()), int((test.bias != test.labels).sum())) == (7, 4, 3)
    batch = next(iter(dm.test_dataloader()[0]))
    assert set(batch) == {"image", "label", "bias", "index"}
    assert batch["image"].shape == (7, 3, 16, 16) and batch["image"].dtype == torch.float32
    # Normalisation uses the train split's statistics; pixels come back exactly.
    raw = dm.denormalize(batch["image"][0]) * 255
    assert torch.allclose(raw, torch.full_like(raw, 10.0 * 14), atol=1e-3)
    assert dm.image_size == 16 and dm.num_channels == 3 and dm.num_classes == 2


def test_reader_keeps_native_size_and_subsamples_conflicts(tmp_path: Path) -> None:
    root = write_fixture(tmp_path)
    dm = BFFHQDataModule(root=str(root), image_size=None, conflict_fraction=0.5)
    assert dm.image_size == 12
    train_ds = dm.split("train")
    assert len(train_ds) == 9 and int((train_ds.bias != train_ds.labels).sum()) == 1
    assert len(BFFHQDataModule(root=str(root), max_train_samples=3).split("train")) == 3


def test_reader_flips_bias_when_align_pairs_opposite_genders(tmp_path: Path) -> None:
    for i, (age, gender) in enumerate([(0, 1), (1, 0), (0, 1), (1, 0)]):
        _png(tmp_path / "0.5pct" / "align" / str(age) / f"{i}_{age}_{gender}.png", i)
    for i, (age, gender) in enumerate([(0, 1), (1, 1)]):
        _png(tmp_path / "valid" / f"{i}_{age}_{gender}.png", i)
        _png(tmp_path / "test" / f"{i}_{age}_{gender}.png", i)
    dm = BFFHQDataModule(root=str(tmp_path), image_size=8)
    assert int((dm.split("train").bias == dm.split("train").labels).sum()) == 4  # all aligned
    assert dm.split("val_reversed").labels.tolist() == [1]  # (1, 1) conflicts under this mapping


@pytest.mark.parametrize(
    ("breakage", "pattern"),
    [
        ("no_root", "data.root is not set"),
        ("missing_pct", r"0\.5pct.*present: \['1pct'\]"),
        ("missing_valid", r"valid.*does not exist"),
        ("bad_name", r"00003_0\.png"),
        ("unreadable", r"broken_1_1\.png"),
        ("mixed_sizes", r"big_0_0\.png.*13x12"),
        ("wrong_folder", r"00000_0_0\.png.*folder 1"),
    ],
)
def test_reader_errors_name_the_file(tmp_path: Path, breakage: str, pattern: str) -> None:
    root = write_fixture(tmp_path / "bffhq")
    size: int | None = 16
    if breakage == "missing_pct":
        (root / "0.5pct").rename(root / "1pct")
    elif breakage == "missing_valid":
        for f in (root / "valid").iterdir():
            f.unlink()
        (root / "valid").rmdir()
    elif breakage == "bad_name":
        (root / "0.5pct" / "align" / "0" / "00003_0_0.png").rename(root / "0.5pct" / "align" / "0" / "00003_0.png")
    elif breakage == "unreadable":
        (root / "test" / "broken_1_1.png").write_bytes(b"not a png")
    elif breakage == "mixed_sizes":
        _png(root / "valid" / "big_0_0.png", 1, size=(13, 12))
        size = None
    elif breakage == "wrong_folder":
        (root / "0.5pct" / "align" / "0" / "00000_0_0.png").rename(root / "0.5pct" / "align" / "1" / "00000_0_0.png")
    dm = BFFHQDataModule(root=None if breakage == "no_root" else str(root), image_size=size)
    with pytest.raises(CdistillError, match=pattern):
        dm.setup()


def test_registry_and_bad_arguments() -> None:
    assert isinstance(create_datamodule("bffhq", root="x"), BFFHQDataModule)
    assert isinstance(create_datamodule("faces_proxy", root="x"), FacesProxyDataModule)
    with pytest.raises(CdistillError, match="conflict_fraction"):
        BFFHQDataModule(root="x", conflict_fraction=1.5)
    with pytest.raises(CdistillError, match="conflict_ratio"):
        FacesProxyDataModule(root="x", conflict_ratio=0.0)


# --------------------------------------------------------------------------- proxy


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.png")):
        h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()


def test_proxy_is_deterministic_and_biased_like_bffhq(tmp_path: Path) -> None:
    settings = ProxySettings(n_train=400, n_valid=20, n_test=20, size=32)
    a = ensure_faces_proxy(tmp_path / "a", settings)
    b = ensure_faces_proxy(tmp_path / "b", settings)
    assert _digest(a) == _digest(b)
    conflict = list((a / "0.5pct" / "conflict").rglob("*.png"))
    assert len(conflict) == 2 and len(list((a / "0.5pct").rglob("*.png"))) == 400  # 0.5% conflicting
    assert {p.name.split("_", 1)[1] for p in conflict} == {"0_1.png", "1_0.png"}
    dm = FacesProxyDataModule(root=str(a), n_train=400, n_valid=20, n_test=20, proxy_size=32, image_size=32)
    for split in ("val", "test"):  # unbiased: half conflicting
        ds = dm.split(split)
        assert int((ds.bias != ds.labels).sum()) == 10 and len(ds) == 20
    # Regenerated only when missing or stale.
    stamp = (a / MARKER).stat().st_mtime_ns
    ensure_faces_proxy(a, settings)
    assert (a / MARKER).stat().st_mtime_ns == stamp
    other = ProxySettings(n_train=400, n_valid=20, n_test=20, size=32, seed=1)
    ensure_faces_proxy(a, other)
    assert json.loads((a / MARKER).read_text())["seed"] == 1 and _digest(a) != _digest(b)


def test_proxy_cues_differ_where_they_should(tmp_path: Path) -> None:
    """Hair length (gender) changes the lower part of the image; wrinkles (age) only thin
    lines higher up, much less ink; everything else (noise included) is the same."""
    from datamodules.faces_proxy import draw_face

    def face(age: int, gender: int) -> np.ndarray:
        return draw_face(np.random.default_rng(5), age, gender, 64, 0.35).astype(float)

    gender_diff = np.abs(face(0, 0) - face(0, 1)).mean(-1)
    age_diff = np.abs(face(0, 0) - face(1, 0)).mean(-1)
    assert gender_diff[52:].mean() > 5 and age_diff[52:].max() == 0
    assert 0 < age_diff.mean() < gender_diff.mean() / 3


def test_proxy_refuses_foreign_folder_and_writes_concept_sets(tmp_path: Path) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    with pytest.raises(CdistillError, match="not a faces proxy"):
        ensure_faces_proxy(tmp_path / "mine", ProxySettings(n_train=40, size=32))
    root = ensure_faces_proxy(tmp_path / "p", ProxySettings(n_train=40, n_valid=8, n_test=8, size=32))
    sets = load_spec(root / "concepts.yaml", size=32)
    assert sorted(k for k in sets if not k.startswith("random/")) == ["age_0", "age_1", "gender_0", "gender_1"]
    assert [f"random/{i}" for i in range(10)] == sorted((k for k in sets if k.startswith("random/")),
                                                         key=lambda k: int(k.split("/")[1]))
    assert sets["gender_1"].shape == (150, 3, 32, 32)
    genders = {p.stem.rsplit("_", 1)[1] for p in (root / "concepts" / "gender_0").iterdir()}
    ages = {p.stem.split("_")[1] for p in (root / "concepts" / "gender_0").iterdir()}
    assert genders == {"0"} and ages == {"0", "1"}


# --------------------------------------------------------------------------- experiments


@pytest.mark.parametrize("experiment", ["faces/baseline", "faces/cd", "faces/cd_gradient"])
def test_faces_experiments_fast_dev_run(make_cfg: MakeCfg, tmp_path: Path, experiment: str) -> None:
    cfg = make_cfg(f"experiment={experiment}", "debug=fdr", f"data.root={tmp_path}/proxy", *TINY)
    metrics = train(cfg)
    for key in ("test/acc", "test/acc_aligned", "test/acc_conflicting", "val_reversed/acc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    if experiment == "faces/cd":  # the default recipe: the counterfactual at the pixels and the stem
        assert "train/counterfactual" in metrics and "train/output" in metrics
    if experiment == "faces/cd_gradient":
        assert "train/concept" in metrics


@pytest.mark.slow
def test_faces_pipeline_reports_tcav(make_cfg: MakeCfg, tmp_path: Path) -> None:
    from cdistill.cli.pipeline import run_pipeline

    cfg = make_cfg("experiment=faces/cd", "debug=fdr", f"data.root={tmp_path}/proxy", *TINY, "pipeline.seeds=[0]")
    records = run_pipeline(cfg)
    md = (Path(cfg.paths.output_dir) / "pipeline.md").read_text()
    assert "bias-aligned" in md and "bias TCAV p" in md
    for stage in ("base", "cd"):
        assert 0.0 <= records[0][stage]["tcav"] <= 1.0 and 0.0 <= records[0][stage]["tcav_p"] <= 1.0


@pytest.mark.slow
def test_faces_baseline_ddp_sim(tmp_path: Path) -> None:
    args = ["experiment=faces/baseline", "trainer=ddp_sim", "debug=limit", f"data.root={tmp_path}/proxy", *TINY,
            "data.batch_size=8", f"hydra.run.dir={tmp_path}/run", "trainer.enable_progress_bar=false"]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc_conflicting"] <= 1.0 and "paper/test/acc" in metrics
