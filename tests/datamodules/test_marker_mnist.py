"""MarkerMNIST (class-specific glyphs in the margin), its concept spec, and the ``unbiased``
oracle option of every bias family."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig
from torch import Tensor

from cdistill.concepts import load_spec
from cdistill.concepts.glyphs import (
    GLYPH_NAMES,
    GLYPH_SIZE,
    draw_glyphs,
    free_positions,
    glyph_masks,
    stamp_glyphs,
)
from cdistill.errors import CdistillError
from datamodules import (
    BiasedMNISTDataModule,
    ColorMNISTDataModule,
    DecoyMNISTDataModule,
    FacesProxyDataModule,
    MarkerMNISTDataModule,
    TextureMNISTDataModule,
    create_datamodule,
)
from datamodules.splits import make_generator

MakeCfg = Callable[..., DictConfig]
SPEC = Path(__file__).resolve().parents[2] / "concepts" / "marker_mnist.yaml"
_CACHE: dict[tuple[type, int, bool], BiasedMNISTDataModule] = {}


def built(cls: type[BiasedMNISTDataModule], seed: int = 0, unbiased: bool = False) -> BiasedMNISTDataModule:
    """One set-up datamodule per (class, seed, unbiased), shared across tests (read-only use)."""
    key = (cls, seed, unbiased)
    if key not in _CACHE:
        dm = cls(seed=seed, unbiased=unbiased)
        dm.setup("fit")
        _CACHE[key] = dm
    return _CACHE[key]


def corners(cue: Tensor) -> tuple[Tensor, Tensor]:
    """MarkerMNIST's ``cue`` (row * 28 + col) -> (rows, cols)."""
    return cue // 28, cue % 28


def data_hash(dm: BiasedMNISTDataModule) -> str:
    """sha256 over images, bias, cue and labels of every split but the held-out ones (``val_random``
    came later, from a generator of its own)."""
    h = hashlib.sha256()
    for name in ("train", *dm.val_names, *dm.test_names):
        ds = dm.split(name)
        for t in (ds.images, ds.bias, ds.cue, ds.labels):
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- glyphs


def test_glyphs_are_ten_distinct_5x5_shapes() -> None:
    masks = glyph_masks()
    assert masks.shape == (10, GLYPH_SIZE, GLYPH_SIZE) and masks.dtype == torch.bool
    assert len(GLYPH_NAMES) == 10
    flat = masks.flatten(1)
    assert all(not torch.equal(flat[a], flat[b]) for a in range(10) for b in range(a + 1, 10))
    assert all(4 <= int(m.sum()) <= 16 for m in masks)  # a few pixels, never a filled patch
    assert masks[0, 2].all() and masks[0, :, 2].all() and int(masks[0].sum()) == 9  # plus


def test_stamp_draws_exactly_the_glyph_at_the_corner() -> None:
    images = torch.zeros(3, 12, 12, dtype=torch.uint8)
    images[:, 0, 0] = 7
    out = stamp_glyphs(images, torch.tensor([0, 4, 9]), torch.tensor([1, 7, 3]), torch.tensor([2, 0, 6]), level=200)
    for i, (g, r, c) in enumerate([(0, 1, 2), (4, 7, 0), (9, 3, 6)]):
        expected = images[i].clone()
        expected[r : r + 5, c : c + 5][glyph_masks()[g]] = 200
        assert torch.equal(out[i], expected)
    assert int(images.sum()) == 21  # the input is not modified
    with pytest.raises(CdistillError, match="level"):
        stamp_glyphs(images, torch.tensor([0, 0, 0]), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long), 0)


def test_free_positions_prefer_margin_then_ink_free_boxes() -> None:
    gen = torch.Generator().manual_seed(0)
    ink = torch.zeros(2, 28, 28)
    ink[0, 4:24, 8:20] = 1  # a digit's bbox: only the left/right margins are free
    ink[1, 1:27, 1:27] = 1
    ink[1, 10:20, 10:20] = 0  # bbox covers all: the ink-free hole must be used
    rows, cols = free_positions(ink, gen)
    assert int(cols[0]) + 5 <= 8 or int(cols[0]) >= 20
    assert 10 <= int(rows[1]) <= 15 and 10 <= int(cols[1]) <= 15
    many = free_positions(ink[:1].expand(200, -1, -1), gen)[1]
    assert (many < 4).any() and (many >= 20).any()  # both margins used, at random


# --------------------------------------------------------------------------- MarkerMNIST


def test_marker_split_sizes_and_interface() -> None:
    dm = create_datamodule("marker_mnist")
    assert isinstance(dm, MarkerMNISTDataModule)
    assert (dm.num_channels, dm.test_names) == (1, ["test", "test_random_glyph"])
    dm = built(MarkerMNISTDataModule)
    sizes = {n: len(dm.split(n)) for n in dm.split_names}
    assert sizes == {"train": 3000, "val": 500, "val_reversed": 500, "val_random": 1000, "test": 1000,
                     "test_random_glyph": 1000}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "bias", "index"} and batch["image"].shape == (64, 1, 28, 28)


def redraw(ds_split: str, digits: Tensor, glyph: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """What the datamodule should have drawn: :func:`draw_glyphs` on the split's generator."""
    gen = make_generator(seed, "cues", ds_split)
    if ds_split == "test_random_glyph":
        torch.randint(0, 10, glyph.shape, generator=gen)  # the glyph draw comes first
    return draw_glyphs(digits, glyph, gen, 255, GLYPH_SIZE, 24)


@pytest.mark.parametrize(
    ("split", "expected"),
    [("train", "y"), ("val", "y"), ("val_reversed", "9-y"), ("test", "9-y"), ("test_random_glyph", "random")],
)
def test_marker_glyph_class_and_placement(split: str, expected: str) -> None:
    ds = built(MarkerMNISTDataModule).split(split)
    if expected == "y":
        assert torch.equal(ds.bias, ds.labels)
    elif expected == "9-y":
        assert torch.equal(ds.bias, 9 - ds.labels)
    else:
        assert torch.bincount(ds.bias, minlength=10).min() > 60 and (ds.bias == ds.labels).float().mean() < 0.2
    # The image is the digit plus 24 copies of glyph `bias`, drawn by the shared code.
    images, corner = redraw(split, ds.digits, ds.bias)
    assert torch.equal(ds.images[:, 0], images)
    assert torch.equal(corner[:, 0, 0] * 28 + corner[:, 0, 1], ds.cue)
    ink = ds.digits > 0
    assert float(((images != ds.digits) & ink).sum() / ink.sum()) < 0.03  # the digit stays intact
    # The first copy never covers ink, and misses the digit's bounding box wherever there is room.
    rows, cols = corners(ds.cue)
    box_ink = torch.stack([ds.digits[i, r : r + 5, c : c + 5].sum() for i, (r, c) in enumerate(zip(rows, cols, strict=True))])
    assert int((box_ink > 0).sum()) == 0
    outside = 0
    for i in range(len(ds)):
        on = ds.digits[i] > 0
        rr, cc = on.any(1).nonzero().flatten(), on.any(0).nonzero().flatten()
        r, c = int(rows[i]), int(cols[i])
        outside += r + 4 < rr.min() or r > rr.max() or c + 4 < cc.min() or c > cc.max()
    assert outside / len(ds) > 0.95


def test_marker_single_glyph_option_draws_exactly_one() -> None:
    dm = MarkerMNISTDataModule(glyph_copies=1, glyph_size=7, max_train_samples=50)
    ds = dm.split("train")
    rows, cols = corners(ds.cue)
    assert torch.equal(ds.images[:, 0], stamp_glyphs(ds.digits, ds.labels, rows, cols, 255, 7))
    assert glyph_masks(7).shape == (10, 7, 7)


def test_marker_same_seed_identical_other_seed_differs() -> None:
    a, b = built(MarkerMNISTDataModule), MarkerMNISTDataModule(seed=0)
    assert data_hash(a) == data_hash(b)
    c = built(MarkerMNISTDataModule, seed=1)
    assert not torch.equal(a.split("train").cue, c.split("train").cue[: len(a.split("train"))])
    assert data_hash(a) != data_hash(c)


@pytest.mark.parametrize(
    ("kw", "name"),
    [({"glyph_level": 0}, "glyph_level"), ({"glyph_size": 4}, "glyph_size"), ({"glyph_copies": 0}, "glyph_copies")],
)
def test_marker_bad_glyph_settings(kw: dict[str, int], name: str) -> None:
    with pytest.raises(CdistillError, match=name):
        MarkerMNISTDataModule(**kw)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- concept spec


def test_marker_concept_spec_draws_the_data_glyphs() -> None:
    sets = load_spec(SPEC)
    assert sets.keys() == {*(f"glyph_{k}" for k in range(10)), "strokes", *(f"random/{s}" for s in range(10))}
    assert sets["glyph_3"].shape == (150, 1, 28, 28) and sets["strokes"].shape == (300, 1, 28, 28)
    assert sets["random/0"].shape == (150, 1, 28, 28)
    masks = glyph_masks()
    for k in (0, 5, 9):
        imgs = sets[f"glyph_{k}"][:, 0]
        # Where the glyph sits: the one 5x5 window that holds the glyph's pixels at 255.
        hits = 0
        for img in imgs[:20]:
            win = img.unfold(0, 5, 1).unfold(1, 5, 1)  # [24, 24, 5, 5]
            full = (win[..., masks[k]] == 255).all(-1)
            hits += bool(full.any())
        assert hits == 20, k
    assert torch.equal(load_spec(SPEC)["glyph_4"], sets["glyph_4"])  # deterministic


def test_glyph_kind_needs_a_glyph_id() -> None:
    from cdistill.concepts import generate

    with pytest.raises(CdistillError, match="glyph"):
        generate("glyph", 4, 0, "g", size=28, channels=1)
    one = generate("glyph", 4, 0, "g", size=28, channels=1, glyph=2)
    strokes = (one[:, 0] > 0) & (one[:, 0] < 255)  # anti-aliased stroke edges: strokes are there
    assert one.shape == (4, 1, 28, 28) and strokes.any()


# --------------------------------------------------------------------------- unbiased oracle

#: sha256 of every split of each family with seed 0 and the embedded digits, computed on the
#: code before ``unbiased`` existed (main 8b8fb45): the default must not change the data.
BEFORE = {
    ColorMNISTDataModule: "97020a4ce9d01f2b72d252df04ce3381fde2496e18f355fd6d76445f5b7088db",
    DecoyMNISTDataModule: "a75cd92285cf1ecf3b5de0e3c9ce9ec1bfb325223335b64c89fd98effe9ca1b3",
    TextureMNISTDataModule: "fdc964dc1b9c44498878541cbf33e98a640fb33c67629db07b9d29e72475b49b",
}
FAMILIES = [ColorMNISTDataModule, DecoyMNISTDataModule, TextureMNISTDataModule, MarkerMNISTDataModule]


@pytest.mark.parametrize("cls", list(BEFORE))
def test_unbiased_false_leaves_the_data_bitwise_unchanged(cls: type[BiasedMNISTDataModule]) -> None:
    assert data_hash(built(cls)) == BEFORE[cls]


@pytest.mark.parametrize("cls", FAMILIES)
def test_unbiased_decorrelates_only_the_training_cue(cls: type[BiasedMNISTDataModule]) -> None:
    base, oracle = built(cls), built(cls, unbiased=True)
    train = oracle.split("train")
    assert torch.equal(train.labels, base.split("train").labels)
    assert torch.equal(train.digits, base.split("train").digits)
    # bias = the class the cue points to, now independent of the label: a 10x10 table of
    # ~30 per cell (3000 images); chi-square with 81 dof stays far below 150.
    table = torch.bincount(train.labels * 10 + train.bias, minlength=100).view(10, 10).double()
    expected = table.sum(1, keepdim=True) * table.sum(0, keepdim=True) / table.sum()
    chi2 = float(((table - expected) ** 2 / expected).sum())
    assert chi2 < 150 and table.min() > 5
    assert 0.05 < float((train.bias == train.labels).double().mean()) < 0.15
    assert not torch.equal(train.images, base.split("train").images)
    for name in base.split_names[1:]:  # val, val_reversed and the tests are unchanged
        a, b = base.split(name), oracle.split(name)
        assert torch.equal(a.images, b.images) and torch.equal(a.bias, b.bias), name
    # Same cue renderer: rendering the oracle's cue classes through the biased code path
    # gives the same images (e.g. a random colour is still a palette colour).
    if cls is MarkerMNISTDataModule:
        assert torch.equal(train.images[:, 0], redraw("train", train.digits, train.bias)[0])
        assert torch.equal(train.cue, base.split("train").cue)  # first positions unchanged


def test_unbiased_faces_proxy_has_half_conflicting_training_faces(tmp_path: Path) -> None:
    kw = {"n_train": 40, "n_valid": 8, "n_test": 8, "proxy_size": 16, "image_size": 16}
    base = FacesProxyDataModule(root=str(tmp_path / "proxy"), **kw)  # type: ignore[arg-type]
    oracle = FacesProxyDataModule(root=str(tmp_path / "proxy"), unbiased=True, **kw)  # type: ignore[arg-type]
    assert oracle.root == tmp_path / "proxy_unbiased"  # its own cache: the biased one stays
    train = oracle.split("train")
    assert int((train.bias != train.labels).sum()) == 20 and len(train) == 40
    assert int((base.split("train").bias != base.split("train").labels).sum()) == 0  # round(40 * 0.005)
    for name in ("val", "val_reversed", "test"):
        assert torch.equal(base.split(name).images, oracle.split(name).images), name


# --------------------------------------------------------------------------- experiments


def test_marker_cd_experiment_fast_dev_run(make_cfg: MakeCfg) -> None:
    from cdistill.train import train

    for experiment, term in (("cd", "train/counterfactual"), ("cd_gradient", "train/concept")):
        cfg = make_cfg(f"experiment=marker_mnist/{experiment}", "debug=fdr", "data.max_train_samples=200")
        metrics = train(cfg)
        assert term in metrics
        assert 0.0 <= metrics["val_reversed/acc"] <= 1.0


def test_oracle_switch_composes_for_every_family(make_cfg: MakeCfg) -> None:
    import hydra.utils

    for exp in ("color_mnist", "decoy_mnist", "texture_mnist", "marker_mnist"):
        dm = hydra.utils.instantiate(make_cfg(f"experiment={exp}/baseline", "data.unbiased=true").data)
        assert dm.unbiased is True, exp
    faces = hydra.utils.instantiate(make_cfg("experiment=faces/baseline", "data.unbiased=true").data)
    assert faces.unbiased and faces.settings.conflict_ratio == 0.5
