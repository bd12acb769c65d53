"""Waterbirds (WILDS layout) and CelebA (released layout) on tiny fixtures written in those
layouts: splits, target and bias, the bias pairing, bad input, and the experiments end to end."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import DictConfig
from PIL import Image

from cdistill.cli.train import train
from cdistill.errors import CdistillError
from datamodules import DATAMODULES, CelebADataModule, WaterbirdsDataModule

MakeCfg = Callable[..., DictConfig]
PROJECT = Path(__file__).resolve().parents[2]
WATER, LAND = (40, 90, 200), (60, 160, 50)
CELEBA_ATTRIBUTES = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young"]


def scene(path: Path, background: tuple[int, int, int], bird: int, size: tuple[int, int] = (28, 24)) -> None:
    """A background colour with a small bird-ish blob whose shade is the bird type."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, background)
    im.paste((250, 250, 250) if bird else (20, 20, 20), (8, 8, 16, 14))
    im.save(path)


# (split, y, place): train 8 aligned + 2 conflicting; val and test balanced in place per bird type.
WB_PLAN = ([(0, y, y) for y in (0, 1) * 4] + [(0, 0, 1), (0, 1, 0)]
           + [(s, y, p) for s in (1, 2) for y in (0, 1) for p in (0, 1)])


def write_waterbirds(root: Path) -> Path:
    """The WILDS layout: metadata.csv and <species folder>/<file>.jpg."""
    root.mkdir(parents=True)
    with (root / "metadata.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["img_id", "img_filename", "y", "split", "place", "place_filename"])
        for i, (split, y, place) in enumerate(WB_PLAN):
            rel = f"{y + 1:03d}.{'Water' if y else 'Land'}_bird/bird_{i:04d}.jpg"
            scene(root / rel, WATER if place else LAND, y, size=(28 + i % 3, 24 + i % 5))
            w.writerow([i + 1, rel, y, split, place, f"/b/bamboo_forest/{i:08d}.jpg"])
    return root


# (partition, blond, male): blond mostly women in train.
CA_PLAN = ([(0, 1, 0)] * 4 + [(0, 0, 1)] * 4 + [(0, 0, 0)] * 2 + [(0, 1, 1)]
           + [(p, b, m) for p in (1, 2) for b in (0, 1) for m in (0, 1)])


def write_celeba(root: Path, plan: list[tuple[int, int, int]] = CA_PLAN) -> Path:
    """The released layout: img_align_celeba/, list_attr_celeba.csv, list_eval_partition.csv."""
    (root / "img_align_celeba").mkdir(parents=True)
    attrs = [["image_id", *CELEBA_ATTRIBUTES]]
    parts = [["image_id", "partition"]]
    for i, (part, blond, male) in enumerate(plan):
        name = f"{i + 1:06d}.jpg"
        scene(root / "img_align_celeba" / name, (230, 200, 60) if blond else (60, 40, 30), male, size=(22, 27))
        values = {a: -1 for a in CELEBA_ATTRIBUTES} | {"Blond_Hair": 2 * blond - 1, "Male": 2 * male - 1,
                                                       "Smiling": 1 if i % 2 else -1}
        attrs.append([name, *[values[a] for a in CELEBA_ATTRIBUTES]])
        parts.append([name, part])
    for file, rows in (("list_attr_celeba.csv", attrs), ("list_eval_partition.csv", parts)):
        with (root / file).open("w", newline="") as f:
            csv.writer(f).writerows(rows)
    return root


def write_concepts(root: Path, spec: str, names: tuple[str, str], colours: tuple[tuple[int, int, int], ...]) -> None:
    """Copy the shipped example spec to <root>/concepts.yaml and fill its folders."""
    shutil.copy(PROJECT / "concepts" / spec, root / "concepts.yaml")
    for name, colour in zip(names, colours, strict=True):
        for i in range(8):
            scene(root / name / f"{i}.png", tuple(min(255, c + 5 * i) for c in colour), 0)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(0)
    (root / "random").mkdir()
    for i in range(20):
        pixels = torch.randint(0, 256, (16, 16, 3), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / "random" / f"{i}.png")


def test_waterbirds_reader(tmp_path: Path) -> None:
    dm = WaterbirdsDataModule(root=str(write_waterbirds(tmp_path / "wb")), image_size=16)
    dm.setup("fit")
    assert DATAMODULES["waterbirds"] is WaterbirdsDataModule
    assert [len(dm.split(s)) for s in dm.split_names] == [10, 4, 2, 4]
    train, val_rev = dm.split("train"), dm.split("val_reversed")
    assert train.labels.tolist() == [y for s, y, _ in WB_PLAN if s == 0]
    assert train.bias.tolist() == [p for s, _, p in WB_PLAN if s == 0]  # bias = place
    assert bool((val_rev.bias != val_rev.labels).all())
    assert dm.mean.tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert train[0]["image"].shape == (3, 16, 16)


def test_waterbirds_bad_split_value_names_the_row(tmp_path: Path) -> None:
    root = write_waterbirds(tmp_path / "wb")
    rows = list(csv.reader((root / "metadata.csv").open()))
    rows[3][2] = "1.5"  # line 4, column y
    with (root / "metadata.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    with pytest.raises(CdistillError, match=r"metadata\.csv line 4: column 'y'"):
        WaterbirdsDataModule(root=str(root), image_size=16).setup()


def test_celeba_reader_default_blond_and_male(tmp_path: Path) -> None:
    dm = CelebADataModule(root=str(write_celeba(tmp_path / "ca")), image_size=16)
    dm.setup("fit")
    assert DATAMODULES["celeba"] is CelebADataModule
    train = dm.split("train")
    assert train.labels.tolist() == [b for p, b, _ in CA_PLAN if p == 0]
    # Most training faces pair blond with not-male: bias = 1 - Male (women point to blond).
    assert train.bias.tolist() == [1 - m for p, _, m in CA_PLAN if p == 0]
    assert [len(dm.split(s)) for s in ("val", "val_reversed", "test")] == [4, 2, 4]
    assert dm.split("test").files[0].name == "000016.jpg"


def test_celeba_configurable_attributes_and_pairing(tmp_path: Path) -> None:
    root = write_celeba(tmp_path / "ca")
    dm = CelebADataModule(root=str(root), image_size=16, target="Smiling", bias="Blond_Hair", bias_points_to="same")
    train = dm.split("train")
    assert train.labels.tolist() == [i % 2 for i in range(11)]
    assert train.bias.tolist() == [b for p, b, _ in CA_PLAN if p == 0]


@pytest.mark.parametrize(("breakage", "kwargs", "pattern"), [
    (None, {"target": "Blonde_Hair"}, r"Blonde_Hair.*Blond_Hair.*data\.target"),
    ("value", {}, r"list_attr_celeba\.csv line 3: attribute 'Blond_Hair' holds '0'"),
    ("partition", {}, r"list_attr_celeba\.csv line 2: image '000001\.jpg' has no row in list_eval_partition"),
    ("image", {}, r"000002\.jpg.*does not exist"),
    (None, {"bias_points_to": "up"}, "bias_points_to"),
])
def test_celeba_bad_input(tmp_path: Path, breakage: str | None, kwargs: dict, pattern: str) -> None:
    root = write_celeba(tmp_path / "ca")
    if breakage == "value":
        rows = list(csv.reader((root / "list_attr_celeba.csv").open()))
        rows[2][1 + CELEBA_ATTRIBUTES.index("Blond_Hair")] = "0"
        with (root / "list_attr_celeba.csv").open("w", newline="") as f:
            csv.writer(f).writerows(rows)
    elif breakage == "partition":
        lines = (root / "list_eval_partition.csv").read_text().splitlines()
        (root / "list_eval_partition.csv").write_text("\n".join([lines[0], *lines[2:]]) + "\n")
    elif breakage == "image":
        (root / "img_align_celeba" / "000002.jpg").unlink()
    with pytest.raises(CdistillError, match=pattern):
        CelebADataModule(root=str(root), image_size=16, **kwargs).setup()


def imagenet_like_weights(path: Path) -> Path:
    """A resnet18 state dict with a 1000-class head, like torchvision's ImageNet files."""
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


def tiny_student(tmp_path: Path) -> list[str]:
    """Overrides: a resnet18 at 32 px on CPU instead of the ResNet-50 at 224 on a GPU."""
    return ["debug=fdr", "trainer=cpu", "model.student.name=torchvision:resnet18", "data.image_size=32",
            f"model.student.init_path={imagenet_like_weights(tmp_path / 'r18.pth')}", "data.batch_size=4"]


@pytest.mark.parametrize("experiment", ["waterbirds/baseline", "waterbirds/cd", "celeba/baseline", "celeba/cd"])
def test_experiments_fast_dev_run_on_fixtures(make_cfg: MakeCfg, tmp_path: Path, experiment: str) -> None:
    if experiment.startswith("waterbirds"):
        root = write_waterbirds(tmp_path / "data")
        write_concepts(root, "waterbirds.yaml", ("place_0", "place_1"), (LAND, WATER))
    else:
        root = write_celeba(tmp_path / "data")
        write_concepts(root, "celeba.yaml", ("gender_0", "gender_1"), ((200, 120, 100), (120, 80, 200)))
    cfg = make_cfg(f"experiment={experiment}", f"data.root={root}", *tiny_student(tmp_path))
    metrics = train(cfg)
    for key in ("test/acc", "test/acc_worst_group", "test/acc_group_mean", "worst/test/acc_worst_group",
                "val_reversed/acc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    if experiment.endswith("cd"):
        assert "train/concept" in metrics


def test_waterbirds_pipeline_table_has_worst_group(make_cfg: MakeCfg, tmp_path: Path) -> None:
    from cdistill.cli.pipeline import run_pipeline

    root = write_waterbirds(tmp_path / "data")
    write_concepts(root, "waterbirds.yaml", ("place_0", "place_1"), (LAND, WATER))
    cfg = make_cfg("experiment=waterbirds/cd", f"data.root={root}", *tiny_student(tmp_path), "pipeline.seeds=[0]",
                   "pipeline.tcav.layer=layer4.1.conv1")
    run_pipeline(cfg)
    md = (Path(cfg.paths.output_dir) / "pipeline.md").read_text()
    assert "test acc, worst (label, bias) group (worst selection)" in md
    assert "mean over (label, bias) groups (strict selection)" in md
