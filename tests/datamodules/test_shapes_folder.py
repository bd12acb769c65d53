"""The generated shapes folder dataset (datamodules/shapes_folder.py): its layout is what
FolderDataModule and the concept loader read, its cue statistics per split are as documented,
it is deterministic, and its unbiased twin differs only in the training cue."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cdistill.concepts import load_spec
from cdistill.errors import CdistillError
from datamodules import FolderDataModule
from datamodules.shapes_folder import (
    PALETTE,
    SHAPES,
    cue_plan,
    main,
    unbiased_twin,
    write_shapes_folder,
)

TINY = {"n_train": 40, "n_val": 12, "n_val_reversed": 8, "n_test": 20, "concept_images": 10, "image_size": 16}


def _rows(root: Path) -> list[dict[str, str]]:
    with (root / "metadata.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_folder(tmp_path_factory.mktemp("shapes") / "data", **TINY)  # type: ignore[arg-type]


def test_the_layout_is_read_by_the_folder_datamodule_and_the_concept_loader(tiny: Path) -> None:
    settings = yaml.safe_load((tiny / "data.yaml").read_text())
    assert settings == {"num_classes": 4, "image_size": 16, "channels": 3, "random_cue_split": "test"}
    dm = FolderDataModule(root=str(tiny), batch_size=8, **settings)
    dm.setup("fit")
    assert dm.val_names == ["val", "val_reversed"] and dm.test_names == ["test"]
    assert [len(dm.split(s)) for s in dm.split_names] == [40, 12, 8, 20]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 16, 16)
    assert set(dm.split("train").labels.tolist()) == {0, 1, 2, 3}
    sets = load_spec(tiny / "concepts.yaml")
    assert sorted(sets) == [*(f"bias_{k}" for k in range(4)), *(f"random/{s}" for s in range(5))]
    assert all(sets[f"bias_{k}"].shape == (10, 3, 16, 16) for k in range(4))
    assert sum(len(sets[f"random/{s}"]) for s in range(5)) == 10


def test_every_image_is_drawn_in_the_colour_its_bias_column_names(tiny: Path) -> None:
    for row in _rows(tiny)[::3]:
        pixels = np.asarray(Image.open(tiny / row["path"])).reshape(-1, 3)
        bright = pixels[pixels.max(axis=1) >= 40]  # the background is darker than any cue colour
        assert len(bright) > 0 and (bright == PALETTE[int(row["bias"])]).all(), row
    for k in range(4):  # bias_k: shapes of any class in colour k
        for f in sorted((tiny / "concepts" / f"bias_{k}").glob("*.png"))[:3]:
            pixels = np.asarray(Image.open(f)).reshape(-1, 3)
            assert (pixels[pixels.max(axis=1) >= 40] == PALETTE[k]).all()


def test_the_metadata_follows_the_cue_plan(tiny: Path) -> None:
    rows = _rows(tiny)
    for split in ("train", "val", "val_reversed", "test"):
        labels, cues = cue_plan(split, TINY[f"n_{split}"], 4, 0.03, 0)
        got = [(int(r["label"]), int(r["bias"])) for r in rows if r["split"] == split]
        assert got == list(zip(labels.tolist(), cues.tolist(), strict=True))


def test_cue_statistics_per_split() -> None:
    n, k = 4000, 4
    for split in ("train", "val"):
        labels, cues = cue_plan(split, n, k, 0.03, seed=1)
        conflicting = cues != labels
        assert conflicting.sum() == round(0.03 * n)  # an exact share
        offsets = (cues[conflicting] - labels[conflicting]) % k
        assert set(offsets.tolist()) == {1, 2, 3}  # another colour, each of the K - 1 drawn
        assert np.bincount(labels, minlength=k).tolist() == [n // k] * k
    labels, cues = cue_plan("val_reversed", n, k, 0.03, seed=1)
    assert (cues == (labels + 1) % k).all()
    labels, cues = cue_plan("test", n, k, 0.03, seed=1)
    table = np.zeros((k, k))
    np.add.at(table, (labels, cues), 1)
    cue_given_label = table / table.sum(axis=1, keepdims=True)
    assert np.abs(cue_given_label - 1 / k).max() < 0.05  # the cue independent of the label
    assert abs(float((cues == labels).mean()) - 1 / k) < 0.03


def test_unbiased_plan_draws_the_training_cue_independently_and_keeps_the_labels() -> None:
    n, k = 4000, 4
    labels, cues = cue_plan("train", n, k, 0.03, seed=2)
    labels_u, cues_u = cue_plan("train", n, k, 0.03, seed=2, unbiased=True)
    assert (labels == labels_u).all() and not (cues == cues_u).all()
    assert abs(float((cues_u == labels_u).mean()) - 1 / k) < 0.03
    for split in ("val", "val_reversed", "test"):
        assert all((a == b).all() for a, b in zip(cue_plan(split, 50, k, 0.03, 2), cue_plan(split, 50, k, 0.03, 2, True), strict=True))


def test_same_seed_same_bytes_another_seed_other_data(tmp_path: Path, tiny: Path) -> None:
    again = write_shapes_folder(tmp_path / "again", **TINY)  # type: ignore[arg-type]
    assert _files(again) == _files(tiny)
    other = write_shapes_folder(tmp_path / "other", seed=1, **TINY)  # type: ignore[arg-type]
    assert _rows(other) != _rows(tiny)


def test_the_unbiased_twin_differs_only_in_the_training_colours(tmp_path: Path, tiny: Path) -> None:
    main([str(tmp_path / "data"), "--twin", *(f"--{k.replace('_', '-')}={v}" for k, v in TINY.items())])
    biased, twin = tmp_path / "data", unbiased_twin(tmp_path / "data")
    assert twin == tmp_path / "data_unbiased" and _files(biased) == _files(tiny)  # the CLI writes what the function does
    a, b = _files(biased), _files(twin)
    assert sorted(a) == sorted(b)
    changed = {p for p in a if a[p] != b[p]}
    assert any(p.startswith("images/train/") for p in changed)
    assert {p for p in changed if not p.startswith("images/train/")} == {"metadata.csv", "shapes_folder.json"}
    rows_a, rows_b = _rows(biased), _rows(twin)
    assert [(r["path"], r["label"]) for r in rows_a] == [(r["path"], r["label"]) for r in rows_b]
    assert [r for r in rows_a if r["split"] != "train"] == [r for r in rows_b if r["split"] != "train"]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        if ra["split"] == "train":  # same shape at the same place, only its colour differs
            ia, ib = (np.asarray(Image.open(root / r["path"])) for root, r in ((biased, ra), (twin, rb)))
            assert ((ia.max(axis=2) >= 40) == (ib.max(axis=2) >= 40)).all()
            assert (ia == ib).all() == (ra["bias"] == rb["bias"])


def test_a_rewrite_leaves_no_stale_file_and_a_foreign_folder_is_refused(tmp_path: Path) -> None:
    root = write_shapes_folder(tmp_path / "d", **(TINY | {"concept_images": 12}))  # type: ignore[arg-type]
    write_shapes_folder(root, **TINY)  # type: ignore[arg-type]
    assert len(list((root / "concepts" / "random").iterdir())) == 10
    assert len(list((root / "images" / "train").iterdir())) == 40
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "photo.png").write_bytes(b"")
    with pytest.raises(CdistillError, match="not written by"):
        write_shapes_folder(tmp_path / "mine", **TINY)  # type: ignore[arg-type]
    with pytest.raises(CdistillError, match="num_classes"):
        write_shapes_folder(tmp_path / "many", num_classes=len(SHAPES) + 1)


def test_the_random_cue_split_must_be_a_test_split(tiny: Path) -> None:
    dm = FolderDataModule(root=str(tiny), num_classes=4, image_size=16, random_cue_split="test_random")
    with pytest.raises(CdistillError, match="random_cue_split"):
        dm.setup()
    assert FolderDataModule(root=str(tiny), num_classes=4).random_cue_split is None
