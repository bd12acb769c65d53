"""Intrinsic-image data: the synthetic generator, the datamodule and the MIT / IIW readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdistill.errors import CdistillError
from datamodules.intrinsic import IntrinsicDataModule
from datamodules.intrinsic_readers import IIWJudgements, MITIntrinsic, read_iiw_judgements
from datamodules.intrinsic_synth import (
    TEST_LIGHTS,
    TRAIN_LIGHTS,
    complement,
    concept_pairs,
    degrees,
    generate,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_generator_is_deterministic_and_composes() -> None:
    a, b = generate(16, 16, TRAIN_LIGHTS, _gen(3)), generate(16, 16, TRAIN_LIGHTS, _gen(3))
    assert torch.equal(a.image, b.image) and torch.equal(a.shading, b.shading)
    assert not torch.equal(a.image, generate(16, 16, TRAIN_LIGHTS, _gen(4)).image)
    torch.testing.assert_close(a.image, a.reflectance * a.shading)
    assert a.image.shape == (16, 3, 16, 16) and a.shading.shape == (16, 3, 16, 16)
    assert float(a.image.min()) >= 0 and float(a.image.max()) <= 1
    # Albedo is piecewise constant: far fewer distinct colours than pixels.
    assert len(torch.unique(a.reflectance[0].flatten(1), dim=1)) <= 8


def test_light_sectors_are_respected() -> None:
    for sector in (TRAIN_LIGHTS, TEST_LIGHTS):
        s = generate(200, 8, sector, _gen())
        az, el = degrees(s.light)
        az = torch.where(az < sector.azimuth[0] - 1e-3, az + 360, az)
        assert float(az.min()) >= sector.azimuth[0] - 1e-3 and float(az.max()) <= sector.azimuth[1] + 1e-3
        assert float(el.min()) >= sector.elevation[0] - 1e-3 and float(el.max()) <= sector.elevation[1] + 1e-3
    warm = generate(50, 8, TRAIN_LIGHTS, _gen()).colour
    cool = generate(50, 8, TEST_LIGHTS, _gen()).colour
    assert bool((warm[:, 0] > warm[:, 2]).all()) and bool((cool[:, 2] > cool[:, 0]).all())
    other = complement(TRAIN_LIGHTS)
    assert other.azimuth[0] > TRAIN_LIGHTS.azimuth[1] and other.tint[1] < TRAIN_LIGHTS.tint[0]


def test_concept_pairs_change_one_factor() -> None:
    pairs = concept_pairs(12, 16, TRAIN_LIGHTS, _gen())
    again = concept_pairs(12, 16, TRAIN_LIGHTS, _gen())
    for name in ("illumination", "material"):
        before, after = pairs[name]
        assert before.shape == after.shape == (12, 3, 16, 16)
        assert not torch.allclose(before, after)
        assert torch.equal(before, again[name][0]) and torch.equal(after, again[name][1])
    # Both sets start from the same scenes (same geometry, albedo and training light).
    base = pairs["illumination"][0]
    m0, m1 = pairs["material"]
    assert bool(((m0 == base).flatten(1).all(1) | (m1 == base).flatten(1).all(1)).all())


def test_datamodule_splits_and_shift() -> None:
    dm = IntrinsicDataModule(seed=0, image_size=16, num_train=40, num_val=10, num_test=10)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "reflectance", "shading", "mask", "index"}
    assert dm.val_names == ["val", "val_relit"] and dm.test_names[0] == "test"
    # Relit splits are warm vs cool: the red/blue balance of the shading flips.
    val, test = dm.split("val"), dm.split("test")
    assert float(val.shading[:, 0].mean()) > float(val.shading[:, 2].mean())  # type: ignore[attr-defined]
    assert float(test.shading[:, 2].mean()) > float(test.shading[:, 0].mean())  # type: ignore[attr-defined]
    again = IntrinsicDataModule(seed=0, image_size=16, num_train=40, num_val=10, num_test=10)
    assert torch.equal(again.split("test").image, test.image)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ MIT


def _png(path: Path, arr: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)


def write_mit(root: Path, objects: tuple[str, ...] = ("apple", "box"), size: int = 12) -> None:
    rng = np.random.default_rng(0)
    for name in objects:
        refl = rng.integers(20, 255, (size, size, 3), dtype=np.uint8)
        shading = rng.integers(0, 65535, (size, size), dtype=np.uint16)  # 16-bit, as MIT ships
        orig = (refl.astype(np.float64) * (shading[..., None] / 65535.0)).astype(np.uint8)
        mask = np.full((size, size), 255, np.uint8)
        mask[:2] = 0
        _png(root / name / "reflectance.png", refl)
        _png(root / name / "original.png", orig)
        _png(root / name / "shading.png", shading)
        _png(root / name / "mask.png", mask)


def test_mit_reader_reads_the_layout(tmp_path: Path) -> None:
    write_mit(tmp_path)
    ds = MITIntrinsic(tmp_path)
    assert ds.names == ["apple", "box"] and len(ds) == 2
    item = ds[0]
    assert item["image"].shape == (3, 12, 12) and item["shading"].shape == (1, 12, 12)
    assert float(item["shading"].max()) <= 1 and float(item["shading"].max()) > 0.5  # 16-bit scaled
    assert float(item["mask"][0, 0].max()) == 0 and float(item["mask"][0, 5].min()) == 1
    torch.testing.assert_close(item["image"], item["reflectance"] * item["shading"], atol=1 / 255 + 1e-4, rtol=0)
    small = MITIntrinsic(tmp_path, size=8)
    assert small[1]["reflectance"].shape == (3, 8, 8)


def test_datamodule_reads_mit_from_root(tmp_path: Path) -> None:
    write_mit(tmp_path)
    dm = IntrinsicDataModule(image_size=16, num_train=8, num_val=4, num_test=4, root=str(tmp_path))
    assert dm.test_names[-1] == "test_mit"
    batch = next(iter(dm.test_dataloader()[-1]))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["shading"].shape == (2, 3, 16, 16)


def test_mit_missing_file_names_it(tmp_path: Path) -> None:
    write_mit(tmp_path)
    (tmp_path / "box" / "shading.png").unlink()
    with pytest.raises(CdistillError, match=r"box/shading\.png"):
        MITIntrinsic(tmp_path)


def test_mit_missing_root_and_empty_root(tmp_path: Path) -> None:
    with pytest.raises(CdistillError, match="nope"):
        MITIntrinsic(tmp_path / "nope")
    with pytest.raises(CdistillError, match="no object folders"):
        MITIntrinsic(tmp_path)


def test_mit_mixed_sizes_name_the_file(tmp_path: Path) -> None:
    write_mit(tmp_path)
    _png(tmp_path / "apple" / "mask.png", np.full((10, 12), 255, np.uint8))
    with pytest.raises(CdistillError, match=r"apple/mask\.png"):
        MITIntrinsic(tmp_path)
    write_mit(tmp_path)
    write_mit(tmp_path, ("box",), size=16)  # objects of different sizes cannot be batched
    with pytest.raises(CdistillError, match=r"box/original\.png"):
        MITIntrinsic(tmp_path)
    assert len(MITIntrinsic(tmp_path, size=8)) == 2  # unless resized


def test_mit_wrong_mode_names_the_file(tmp_path: Path) -> None:
    write_mit(tmp_path)
    _png(tmp_path / "box" / "shading.png", np.zeros((12, 12, 3), np.uint8))  # RGB where grey belongs
    with pytest.raises(CdistillError, match=r"box/shading\.png.*mode 'RGB'"):
        MITIntrinsic(tmp_path)


# ------------------------------------------------------------------------------ IIW


def write_iiw(root: Path, photo: str = "100", judgements: bool = True) -> None:
    _png(root / f"{photo}.png", np.full((10, 20, 3), 128, np.uint8))
    data = {
        "intrinsic_points": [
            {"id": 1, "x": 0.1, "y": 0.5, "opaque": True},
            {"id": 2, "x": 0.9, "y": 0.5, "opaque": True},
        ],
        "intrinsic_comparisons": [{"point1": 1, "point2": 2, "darker": "1", "darker_score": 0.8}] if judgements else [],
    }
    (root / f"{photo}.json").write_text(json.dumps(data))


def test_iiw_reader(tmp_path: Path) -> None:
    write_iiw(tmp_path, "100")
    write_iiw(tmp_path, "200")
    ds = IIWJudgements(tmp_path, size=8)
    assert ds.ids == ["100", "200"] and ds[0].image.shape == (3, 8, 8)
    assert ds[1].points[2] == (0.9, 0.5, True)
    assert ds[0].comparisons == [(1, 2, "1", 0.8)]


def test_iiw_bad_input_names_the_file(tmp_path: Path) -> None:
    write_iiw(tmp_path, "100", judgements=False)
    with pytest.raises(CdistillError, match=r"100\.json.*no judgements"):
        IIWJudgements(tmp_path)
    write_iiw(tmp_path, "100")
    (tmp_path / "100.json").unlink()
    with pytest.raises(CdistillError, match=r"100\.json"):
        IIWJudgements(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"intrinsic_points": [{"id": 1, "x": 0, "y": 0}],
                               "intrinsic_comparisons": [{"point1": 1, "point2": 1, "darker": "3", "darker_score": 1}]}))
    with pytest.raises(CdistillError, match=r"bad\.json.*darker"):
        read_iiw_judgements(bad)
    bad.write_text("{not json")
    with pytest.raises(CdistillError, match=r"bad\.json"):
        read_iiw_judgements(bad)
