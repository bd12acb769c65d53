"""Every datamodule meets the contract cdistill types its data by (cdistill.utils.datamodule), and
the shared constructor arguments (LoaderSettings) behave the same in all of them."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from own_data import write_own_data

from cdistill.errors import CdistillError
from cdistill.utils.datamodule import (
    ConceptPairData,
    ImageData,
    SplitData,
    SplitDataset,
    attached_concept_data,
    attached_data,
)
from datamodules import DATAMODULES, ColorMNISTDataModule, FolderDataModule
from datamodules.intrinsic import IntrinsicDataModule
from datamodules.loaders import LoaderSettings, SplitDataModule


def members(protocol: type) -> set[str]:
    """The public members a protocol declares, its bases' included."""
    return {name for base in protocol.__mro__ if getattr(base, "_is_protocol", False)
            for name in vars(base) if not name.startswith("_")}


def test_members_are_what_the_tasks_read() -> None:
    # Guards the helper: an empty member set would make every check below pass.
    assert members(SplitData) == {"num_channels", "image_size", "batch_size", "eval_batch_size", "val_names",
                                  "test_names", "setup", "split"}
    assert members(ImageData) == members(SplitData) | {"num_classes", "mean", "std", "normalize"}
    assert members(ConceptPairData) == members(SplitData) | {"concept_pairs"}


@pytest.mark.parametrize("name", sorted(DATAMODULES))
def test_every_registered_datamodule_has_the_image_data_members(name: str) -> None:
    # Built without data (root None where there is one): the members are looked up statically, so
    # no property (mean, std) runs setup().
    dm = DATAMODULES[name]()
    assert isinstance(dm, SplitDataModule)
    missing = {m for m in members(ImageData) if not _has_static(dm, m)}
    assert not missing, f"{name} lacks {missing}"
    for method in ("setup", "split", "normalize"):
        assert callable(getattr(dm, method))


def test_intrinsic_datamodule_has_the_concept_pair_members() -> None:
    dm = IntrinsicDataModule(image_size=8, num_train=4, num_val=2, num_test=2)
    assert isinstance(dm, SplitDataModule)
    assert all(_has_static(dm, m) for m in members(ConceptPairData))
    assert not _has_static(dm, "normalize")  # not image data: its images are not normalised


def _has_static(obj: object, name: str) -> bool:
    try:
        inspect.getattr_static(obj, name)
    except AttributeError:
        return False
    return True


def _check_split_data(dm: Any) -> None:
    dm.setup("fit")
    for split in ("train", *dm.val_names, *dm.test_names):
        data = dm.split(split)
        assert isinstance(data, SplitDataset) and len(data) > 0
        image = data[0]["image"]
        assert image.dtype == torch.float32 and tuple(image.shape) == (dm.num_channels, dm.image_size, dm.image_size)
    assert all(isinstance(getattr(dm, k), int) for k in ("num_channels", "image_size", "batch_size", "eval_batch_size"))


def test_built_datamodules_satisfy_their_protocols(tmp_path: Path) -> None:
    colour = ColorMNISTDataModule(max_train_samples=40)
    folder = FolderDataModule(root=str(write_own_data(tmp_path / "own")), image_size=16)
    for dm in (colour, folder):
        _check_split_data(dm)
        assert isinstance(dm, ImageData) and not isinstance(dm, ConceptPairData)
        assert dm.mean.shape == dm.std.shape == (dm.num_channels,)
        x = torch.rand(2, dm.num_channels, dm.image_size, dm.image_size)
        assert torch.allclose(dm.normalize(x), (x - dm.mean.view(-1, 1, 1)) / dm.std.view(-1, 1, 1))
    intrinsic = IntrinsicDataModule(image_size=8, num_train=4, num_val=2, num_test=2, num_concept_pairs=3)
    _check_split_data(intrinsic)
    assert isinstance(intrinsic, ConceptPairData) and not isinstance(intrinsic, ImageData)
    assert {k: tuple(a.shape) for k, (a, _) in intrinsic.concept_pairs().items()} == {
        "illumination": (3, 3, 8, 8), "material": (3, 3, 8, 8)}


def test_attached_data_names_a_missing_datamodule() -> None:
    class Trainer:
        datamodule = None

    class Task:
        pass

    with pytest.raises(CdistillError, match="Task reads its data from the trainer's datamodule"):
        attached_data(Trainer(), Task())
    trainer = Trainer()
    trainer.datamodule = ColorMNISTDataModule()  # type: ignore[assignment]
    assert attached_data(trainer, Task()) is trainer.datamodule
    with pytest.raises(CdistillError, match=r"renders concept pairs.*ColorMNISTDataModule"):
        attached_concept_data(trainer, Task())


# --------------------------------------------------------------------------- loader settings


def test_loader_settings_defaults_and_per_module_overrides() -> None:
    assert LoaderSettings() == LoaderSettings(seed=0, batch_size=64, eval_batch_size=256, num_workers=0,
                                              pin_memory=False, max_train_samples=None, sampler=None)
    dm = ColorMNISTDataModule(seed="3", batch_size=8.0, sampler="none")
    assert (dm.seed, dm.batch_size, dm.eval_batch_size, dm.sampler) == (3, 8, 256, None)
    assert type(dm.seed) is int and type(dm.batch_size) is int
    intrinsic = IntrinsicDataModule(num_train=4, num_val=2, num_test=2, max_train_samples=2)
    assert (intrinsic.batch_size, intrinsic.eval_batch_size, intrinsic.sizes["train"]) == (32, 250, 2)
    assert IntrinsicDataModule(batch_size=5).batch_size == 5


@pytest.mark.parametrize("name", sorted(DATAMODULES))
@pytest.mark.parametrize(("kwargs", "pattern"), [
    ({"batch_size": 0}, r"data.batch_size=0 must be >= 1"),
    ({"eval_batch_size": -1}, r"data.eval_batch_size=-1 must be >= 1"),
    ({"max_train_samples": 0}, r"data.max_train_samples=0 must be >= 1"),
    ({"sampler": "balanced"}, r"data.sampler='balanced'"),
])
def test_every_datamodule_rejects_bad_loader_settings(name: str, kwargs: dict[str, Any], pattern: str) -> None:
    with pytest.raises(CdistillError, match=pattern):
        DATAMODULES[name](**kwargs)


def test_intrinsic_rejects_a_sampler_and_unknown_arguments() -> None:
    with pytest.raises(CdistillError, match="no classes or groups"):
        IntrinsicDataModule(sampler="group_balanced")
    with pytest.raises(TypeError, match="batchsize"):
        ColorMNISTDataModule(batchsize=8)
