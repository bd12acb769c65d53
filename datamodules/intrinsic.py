"""Intrinsic image decomposition data: synthetic scenes (default) and the MIT layout.

Splits (batches ``{"image", "reflectance", "shading", "mask", "index"}``, images in
``[0, 1]``, ``image = reflectance * shading``):

* ``train``, ``val``, ``test_same_light``: lights from the training sector;
* ``val_relit``, ``test``: lights from the shifted test sector ("test scenes lit differently
  from training", :data:`~datamodules.intrinsic_synth.TEST_LIGHTS` by default);
* ``test_mit``: the MIT Intrinsic Images objects under ``root`` (when ``root`` is set).

Every split is a pure function of ``(seed, split name)``. :meth:`concept_pairs` renders the
concept sets (same geometry, only the light or only the material changes). The scenes are
rendered in memory on every :meth:`~IntrinsicDataModule.setup` and never written to disk, so
concurrent runs cannot see a partial set (generated data that is written to disk goes through
:func:`cdistill.utils.build_folder` / :func:`cdistill.utils.build_file`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from cdistill.errors import CdistillError
from datamodules.intrinsic_readers import MITIntrinsic
from datamodules.intrinsic_synth import LightSector, Scenes, concept_pairs, generate
from datamodules.sampler import EpochSeededSampler
from datamodules.splits import make_generator

SYNTH_SPLITS = ("train", "val", "val_relit", "test", "test_same_light")
RELIT_SPLITS = ("val_relit", "test")


class IntrinsicDataset(Dataset[dict[str, Tensor]]):
    """Tensors of one split, served as dicts (see module docstring)."""

    def __init__(self, image: Tensor, reflectance: Tensor, shading: Tensor, mask: Tensor | None = None) -> None:
        self.image, self.reflectance, self.shading = image, reflectance, shading
        self.mask = torch.ones_like(shading) if mask is None else mask

    @classmethod
    def from_scenes(cls, scenes: Scenes) -> IntrinsicDataset:
        return cls(scenes.image, scenes.reflectance, scenes.shading)

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {
            "image": self.image[i], "reflectance": self.reflectance[i], "shading": self.shading[i],
            "mask": self.mask[i], "index": torch.tensor(i),
        }


def _sector(cfg: Any) -> LightSector:
    az, el, tint = (tuple(float(v) for v in cfg.get(k, (0.0, 0.0))) for k in ("azimuth", "elevation", "tint"))
    return LightSector(az, el, tint)  # type: ignore[arg-type]


class IntrinsicDataModule(pl.LightningDataModule):
    """Synthetic intrinsic-image scenes with a train and a shifted test light distribution.

    Args:
        seed: Seed of every split (and of the shuffling).
        image_size: Side of the square images.
        num_train, num_val, num_test: Scenes per split (``val_relit`` has ``num_val``,
            ``test_same_light`` ``num_test``).
        train_lights, test_lights: ``{azimuth: [lo, hi], elevation: [lo, hi]}`` in degrees
            and ``tint: [lo, hi]`` in ``[-1, 1]`` (light colour, blue to orange).
        num_concept_pairs: Pairs per concept set (see :meth:`concept_pairs`).
        root: A folder in the MIT Intrinsic Images layout: adds the ``test_mit`` split.
        batch_size, eval_batch_size, num_workers, pin_memory: Loader settings.
        max_train_samples: Keep only the first N training scenes (tests, quick runs).
    """

    num_channels = 3

    def __init__(
        self,
        seed: int = 0,
        image_size: int = 32,
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 500,
        train_lights: Any = None,
        test_lights: Any = None,
        num_concept_pairs: int = 200,
        root: str | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 250,
        num_workers: int = 0,
        pin_memory: bool = False,
        max_train_samples: int | None = None,
    ) -> None:
        super().__init__()
        self.seed, self.image_size = int(seed), int(image_size)
        self.sizes = {"train": num_train, "val": num_val, "val_relit": num_val, "test": num_test,
                      "test_same_light": num_test}
        if max_train_samples is not None:
            self.sizes["train"] = min(num_train, int(max_train_samples))
        if any(n < 1 for n in self.sizes.values()):
            raise CdistillError(f"Every split needs at least one scene; got sizes {self.sizes}.")
        self.train_lights = _sector(train_lights or {"azimuth": [-45, 45], "elevation": [30, 60], "tint": [0.3, 1]})
        self.test_lights = _sector(test_lights or {"azimuth": [135, 225], "elevation": [30, 60], "tint": [-1, -0.3]})
        self.num_concept_pairs = int(num_concept_pairs)
        self.root = root
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.val_names: list[str] = ["val", "val_relit"]
        self.test_names: list[str] = ["test", "test_same_light"] + (["test_mit"] if root else [])
        self._splits: dict[str, Dataset[dict[str, Tensor]]] = {}

    def setup(self, stage: str | None = None) -> None:
        """Render every split (cheap: about a second per 2,000 scenes of 32 px)."""
        if self._splits:
            return
        for name in SYNTH_SPLITS:
            sector = self.test_lights if name in RELIT_SPLITS else self.train_lights
            gen = make_generator(self.seed, "iid", name)
            self._splits[name] = IntrinsicDataset.from_scenes(generate(self.sizes[name], self.image_size, sector, gen))
        if self.root:
            mit = MITIntrinsic(self.root, size=self.image_size)
            self._splits["test_mit"] = IntrinsicDataset(
                torch.stack([x["image"] for x in mit.items]), torch.stack([x["reflectance"] for x in mit.items]),
                # MIT shading is grey: white light, the same in every channel.
                torch.stack([x["shading"].expand(3, -1, -1) for x in mit.items]),
                torch.stack([x["mask"] for x in mit.items]),
            )

    def split(self, name: str) -> Dataset[dict[str, Tensor]]:
        """The dataset of one split (after :meth:`setup`, which this calls)."""
        self.setup()
        if name not in self._splits:
            raise CdistillError(f"Unknown split {name!r}; this datamodule has {sorted(self._splits)}.")
        return self._splits[name]

    def concept_pairs(self, n: int | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """Concept sets: ``{"illumination" | "material": (before, after)}``, each
        ``[n, 3, H, W]``, rendered with training lights (see
        :func:`datamodules.intrinsic_synth.concept_pairs`). Independent of the splits' scenes."""
        gen = make_generator(self.seed, "iid", "concepts")
        return concept_pairs(n or self.num_concept_pairs, self.image_size, self.train_lights, gen)

    def _loader(self, ds: Dataset[dict[str, Tensor]], batch_size: int, **kw: Any) -> DataLoader[dict[str, Tensor]]:
        return DataLoader(ds, batch_size=batch_size, num_workers=self.num_workers, pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0, **kw)

    def train_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        """Shuffled by an :class:`EpochSeededSampler` (fixed by seed and epoch, DDP-aware)."""
        train = self.split("train")
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochSeededSampler(self.sizes["train"], seed=self.seed, num_replicas=replicas, rank=rank)
        return self._loader(train, self.batch_size, sampler=sampler)

    def _eval_loaders(self, names: Sequence[str]) -> list[DataLoader[dict[str, Tensor]]]:
        return [self._loader(self.split(n), self.eval_batch_size, shuffle=False) for n in names]

    def val_dataloader(self) -> list[DataLoader[dict[str, Tensor]]]:
        return self._eval_loaders(self.val_names)

    def test_dataloader(self) -> list[DataLoader[dict[str, Tensor]]]:
        return self._eval_loaders(self.test_names)
