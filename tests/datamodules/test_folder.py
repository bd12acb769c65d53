"""data=folder: any biased dataset given as images plus a metadata CSV (PNG and JPEG, mixed
sizes and modes), its splits, normalisation, augmentation, sampler, every bad-input error, and a
fast_dev_run through train.py."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from cdistill.cli.train import instantiate, train
from cdistill.errors import CdistillError
from datamodules import DATAMODULES, EpochSeededSampler, FolderDataModule

MakeCfg = Callable[..., DictConfig]
# (split, label, bias): 8 train (6 aligned), 4 val (2 conflicting), 4 test, 2 in an extra split.
PLAN = ([("train", y, y) for y in (0, 1, 0, 1, 0, 1)] + [("train", 0, 1), ("train", 1, 0)]
        + [("val", 0, 0), ("val", 1, 1), ("val", 0, 1), ("val", 1, -1)]
        + [("test", y, 1 - y) for y in (0, 1, 0, 1)] + [("ood", 0, 0), ("ood", 1, 1)])


def write_image(path: Path, index: int, value: int) -> None:
    """PNG or JPEG by index, of mixed sizes and modes (RGB, L, RGBA)."""
    size = (20 + 3 * (index % 4), 16 + 5 * (index % 3))
    mode = ("RGB", "L", "RGBA")[index % 3]
    fill: int | tuple[int, ...] = value if mode == "L" else (value, 255 - value, 128, 255)[: len(mode)]
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new(mode, size, fill)
    if path.suffix == ".jpg":
        im = im.convert("RGB")
    im.save(path)


def write_dataset(root: Path, plan: Sequence[tuple[str, int, int]] = PLAN,
                  header: Sequence[str] = ("path", "label", "bias", "split")) -> Path:
    """Write the images and metadata.csv of ``plan`` under ``root``."""
    rows = []
    for i, (split, label, bias) in enumerate(plan):
        rel = f"img/{split}/{i}.{'png' if i % 2 else 'jpg'}"
        write_image(root / rel, i, 40 + 20 * label)
        rows.append([rel, str(label), "" if bias == -1 and i % 2 else str(bias), split])
    with (root / "metadata.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return root


def edit_csv(root: Path, line: int, column: int, value: str) -> None:
    """Set one cell (line 1 is the header) of root/metadata.csv."""
    rows = list(csv.reader((root / "metadata.csv").open()))
    rows[line - 1][column] = value
    with (root / "metadata.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_dataset(tmp_path / "ds")


def test_splits_batches_and_derived_val_reversed(folder: Path) -> None:
    dm = FolderDataModule(root=str(folder), image_size=24, batch_size=4)
    dm.setup("fit")
    assert dm.val_names == ["val", "val_reversed"] and dm.test_names == ["test", "test_ood"]
    assert [len(dm.split(s)) for s in dm.split_names] == [8, 4, 1, 4, 2]
    assert dm.split("val_reversed").labels.tolist() == [0]  # the one conflicting val row (bias -1 is not)
    assert dm.split("val").bias.tolist() == [0, 1, 1, -1]  # an empty bias cell reads as -1
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "bias", "index"}
    assert batch["image"].shape == (4, 3, 24, 24) and batch["image"].dtype == torch.float32
    assert [len(loader.dataset) for loader in dm.test_dataloader()] == [4, 2]
    assert DATAMODULES["folder"] is FolderDataModule


def test_grey_channels_and_normalisation_from_train(folder: Path) -> None:
    dm = FolderDataModule(root=str(folder), image_size=16, channels=1)
    train = dm.split("train")
    assert train[0]["image"].shape == (1, 16, 16)
    raw = torch.stack([train.raw(i) for i in range(len(train))]).float() / 255
    assert torch.allclose(dm.mean, raw.mean(dim=(0, 2, 3)), atol=1e-5)
    x = torch.stack([train[i]["image"] for i in range(len(train))])
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std(unbiased=False)) - 1) < 1e-3


def test_given_stats_and_a_grey_png_becomes_rgb(folder: Path) -> None:
    dm = FolderDataModule(root=str(folder), image_size=8, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    sample = dm.split("train")[1]  # index 1 is an L-mode PNG: grey repeated over three channels
    assert dm.mean.tolist() == [0.5] * 3
    assert torch.equal(sample["image"][0], sample["image"][1])
    expected = ((40 + 20 * PLAN[1][1]) / 255 - 0.5) / 0.25
    assert float(sample["image"][0, 0, 0]) == pytest.approx(expected, abs=1e-5)


def test_augmentation_from_hydra_config_on_train_only(folder: Path) -> None:
    flip = [{"_target_": "torchvision.transforms.v2.RandomHorizontalFlip", "p": 1.0}]
    dm = FolderDataModule(root=str(folder), image_size=12, augment=OmegaConf.create(flip))
    train, val = dm.split("train"), dm.split("val")
    normalise = (train.raw(2).float() / 255 - train.mean) / train.std
    assert torch.allclose(train[2]["image"], normalise.flip(-1))
    assert torch.allclose(val[0]["image"], (val.raw(0).float() / 255 - val.mean) / val.std)


def test_sampler_is_seeded_and_deterministic(folder: Path) -> None:
    orders = []
    for _ in range(2):
        loader = FolderDataModule(root=str(folder), image_size=8, batch_size=8, seed=3).train_dataloader()
        assert isinstance(loader.sampler, EpochSeededSampler)
        orders.append(next(iter(loader))["index"].tolist())
    assert orders[0] == orders[1] and sorted(orders[0]) == list(range(8))


def test_configurable_columns_and_split_map(tmp_path: Path) -> None:
    plan = [(s.replace("train", "0").replace("val", "1").replace("test", "2"), y, b) for s, y, b in PLAN if s != "ood"]
    root = write_dataset(tmp_path / "ds", plan, header=("file", "y", "place", "part"))
    dm = FolderDataModule(root=str(root), image_size=8, columns={"path": "file", "label": "y", "bias": "place",
                                                                   "split": "part"},
                          split_map={0: "train", 1: "val", 2: "test"})
    assert dm.split_names == ["train", "val", "val_reversed", "test"] and len(dm.split("test")) == 4


BREAKAGES: list[tuple[str, Callable[[Path], None], str]] = [
    ("missing column", lambda r: (r / "metadata.csv").write_text((r / "metadata.csv").read_text().replace("bias", "cue", 1)),
     r"no column 'bias'.*data\.columns\.bias="),
    ("missing split", lambda r: [edit_csv(r, line, 3, "valid") for line in range(10, 14)],
     r"no rows of split \['val'\].*split_map"),
    ("unreadable image", lambda r: (r / "img/train/3.png").write_bytes(b"not an image"),
     r"Cannot read image .*3\.png.*metadata\.csv line 5"),
    ("missing image", lambda r: (r / "img/train/3.png").unlink(), r"metadata\.csv line 5: image .*3\.png.* does not exist"),
    ("label out of range", lambda r: edit_csv(r, 4, 1, "2"), r"metadata\.csv line 4: label 2 is outside \[0, 2\).*num_classes"),
    ("non-integer label", lambda r: edit_csv(r, 6, 1, "cat"), r"metadata\.csv line 6: column 'label' holds 'cat', not an integer"),
    ("fractional label", lambda r: edit_csv(r, 6, 1, "0.5"), r"line 6: column 'label' holds '0.5'"),
    ("bias out of range", lambda r: edit_csv(r, 7, 2, "-2"), r"line 7: bias -2 is outside \[-1, 2\)"),
    ("no metadata", lambda r: (r / "metadata.csv").unlink(), r"metadata\.csv.* does not exist"),
]


@pytest.mark.parametrize(("name", "breakage", "pattern"), BREAKAGES, ids=[b[0] for b in BREAKAGES])
def test_bad_input_is_one_clear_error(folder: Path, name: str, breakage: Callable[[Path], None], pattern: str) -> None:
    breakage(folder)
    with pytest.raises(CdistillError, match=pattern):
        FolderDataModule(root=str(folder), image_size=8).setup("fit")


def test_truncated_image_on_access_names_file_and_row(folder: Path) -> None:
    dm = FolderDataModule(root=str(folder), image_size=8, check_images=False)
    dm.setup("fit")
    data = (folder / "img/train/4.jpg").read_bytes()
    (folder / "img/train/4.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(CdistillError, match=r"4\.jpg.*metadata\.csv line 6"):
        dm.split("train")[4]


@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"root": None}, "data.root is not set"), ({"channels": 2}, "data.channels=2"),
    ({"columns": {"lable": "y"}}, "lable"), ({"mean": [0.5]}, "both data.mean and data.std"),
    ({"mean": [0.5], "std": [0.5]}, "need 3 values"),
])
def test_bad_settings(kwargs: dict, pattern: str) -> None:
    with pytest.raises(CdistillError, match=pattern):
        FolderDataModule(**{"root": None, **kwargs}).setup()


def test_config_composes_and_trains_fast_dev_run(make_cfg: MakeCfg, folder: Path) -> None:
    cfg = make_cfg("experiment=color_mnist/baseline", "data=folder", f"data.root={folder}", "data.image_size=28",
                   "model.num_classes=2", "model.num_bias_groups=2", "model.student.num_classes=2", "debug=fdr",
                   "+data.augment=[{_target_: torchvision.transforms.v2.RandomHorizontalFlip}]")
    assert isinstance(instantiate(cfg.data), FolderDataModule)
    metrics = train(cfg)
    for key in ("test/acc", "test_ood/acc", "val_reversed/acc", "test/acc_worst_group", "test/acc_group_mean"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert np.isfinite(metrics["train/loss"])


def test_folder_runs_can_log_and_checkpoint_their_data_hparams(make_cfg: MakeCfg, folder: Path, tmp_path: Path) -> None:
    """What a run with a logger and checkpoints needs (debug=fdr has neither): the model's
    num_bias_groups equals the data's (Lightning refuses to merge differing hparams), and the
    datamodule's hparams are plain (a checkpoint stores them and loads with weights_only=True)."""
    cfg = make_cfg("experiment=folder/baseline", f"data.root={folder}", "data.num_classes=3", "+data.columns.label=label")
    assert cfg.model.num_bias_groups == cfg.data.num_bias_groups == cfg.model.num_classes == 3
    dm = instantiate(cfg.data)
    assert dm.hparams["num_bias_groups"] == 3 and type(dm.hparams["columns"]) is dict
    torch.save({"datamodule_hyper_parameters": dict(dm.hparams)}, tmp_path / "hp.pt")
    assert torch.load(tmp_path / "hp.pt", weights_only=True)["datamodule_hyper_parameters"]["columns"] == {"label": "label"}
