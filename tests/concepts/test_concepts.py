from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdistill.concepts import generate, load_image_folder, load_spec, preprocess
from cdistill.errors import CdistillError

SPECS = Path(__file__).resolve().parents[2] / "concepts"


@pytest.mark.parametrize("bench", ["color_mnist", "decoy_mnist", "texture_mnist", "marker_mnist"])
def test_shipped_specs_generate_deterministically(bench: str) -> None:
    a = load_spec(SPECS / f"{bench}.yaml")
    b = load_spec(f"concepts/{bench}.yaml")  # relative names resolve against the project
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    randoms = [k for k in a if k.startswith("random/")]
    assert len(randoms) == 10
    assert len({a[k][0].sum().item() for k in randoms}) > 1  # disjoint, different sets
    concept_sets = [k for k in a if not k.startswith("random") and "_" in k]
    assert len(concept_sets) == 10


def test_color_concept_uses_its_palette_colour() -> None:
    from datamodules.color_mnist import PALETTE

    sets = load_spec(SPECS / "color_mnist.yaml")
    img = sets["color_3"].float()
    fg = img.sum(1) > 200  # fully covered stroke pixels
    rgb = img.permute(0, 2, 3, 1)[fg]
    ratio = rgb / rgb.max(1, keepdim=True).values
    expected = PALETTE[3].float() / PALETTE[3].float().max()
    assert torch.allclose(ratio.mean(0), expected, atol=0.02)


def test_decoy_patch_grey_level() -> None:
    sets = load_spec(SPECS / "decoy_mnist.yaml")
    img = sets["patch_2"]
    assert img.shape[1] == 1
    assert int(img.max()) == 255 - 25 * 2
    assert int((img > 0).flatten(1).sum(1).unique().item()) == 25  # one 5x5 patch each


def test_folder_sets_and_errors(tmp_path: Path) -> None:
    for i in range(3):
        Image.fromarray(np.full((10, 12, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    imgs = load_image_folder(tmp_path, size=8, channels=3)
    assert imgs.shape == (3, 3, 8, 8) and imgs.dtype == torch.uint8
    assert load_image_folder(tmp_path, size=8, channels=1).shape == (3, 1, 8, 8)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(CdistillError, match=r"broken\.png"):
        load_image_folder(tmp_path, size=8, channels=3)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CdistillError, match="holds no images"):
        load_image_folder(empty, size=8, channels=3)
    with pytest.raises(CdistillError, match="does not exist"):
        load_image_folder(tmp_path / "nope", size=8, channels=3)


def test_preprocess_matches_student_input() -> None:
    imgs = generate("strokes", 4, 0, "x", size=20, channels=1, fill="white")
    out = preprocess(imgs, lambda x: (x - 0.5) / 0.25, channels=3, size=28)
    assert out.shape == (4, 3, 28, 28)
    with pytest.raises(CdistillError, match="Empty concept set"):
        preprocess(imgs[:0], lambda x: x, channels=3, size=28)
    with pytest.raises(CdistillError, match=r"n=0"):
        generate("strokes", 0, 0, "x")
