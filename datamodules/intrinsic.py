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

from typing import Any

import torch
from torch import Tensor

from cdistill.errors import CdistillError
from cdistill.utils.datamodule import SplitDataset
from datamodules.intrinsic_readers import MITIntrinsic
from datamodules.intrinsic_synth import LightSector, Scenes, concept_pairs, generate
from datamodules.loaders import SplitDataModule
from datamodules.splits import make_generator

SYNTH_SPLITS = ("train", "val", "val_relit", "test", "test_same_light")
RELIT_SPLITS = ("val_relit", "test")


class IntrinsicDataset(SplitDataset):
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


class IntrinsicDataModule(SplitDataModule):
    """Synthetic intrinsic-image scenes with a train and a shifted test light distribution.

    Args:
        image_size: Side of the square images.
        num_train, num_val, num_test: Scenes per split (``val_relit`` has ``num_val``,
            ``test_same_light`` ``num_test``).
        train_lights, test_lights: ``{azimuth: [lo, hi], elevation: [lo, hi]}`` in degrees
            and ``tint: [lo, hi]`` in ``[-1, 1]`` (light colour, blue to orange).
        num_concept_pairs: Pairs per concept set (see :meth:`concept_pairs`).
        root: A folder in the MIT Intrinsic Images layout: adds the ``test_mit`` split.
        **loader: :class:`~datamodules.loaders.LoaderSettings` (``batch_size`` 32 and
            ``eval_batch_size`` 250 by default here; ``seed`` also seeds every split;
            ``max_train_samples`` keeps only the first N training scenes). No ``sampler``: the
            scenes have no classes to balance.
    """

    num_channels = 3

    def __init__(
        self,
        image_size: int = 32,
        num_train: int = 2000,
        num_val: int = 200,
        num_test: int = 500,
        train_lights: Any = None,
        test_lights: Any = None,
        num_concept_pairs: int = 200,
        root: str | None = None,
        **loader: Any,
    ) -> None:
        super().__init__(**{"batch_size": 32, "eval_batch_size": 250, **loader})
        if self.sampler is not None:
            raise CdistillError(f"data.sampler={self.sampler}: the intrinsic scenes have no classes or groups "
                                "to balance; use sampler=null.")
        self.image_size = int(image_size)
        self.sizes = {"train": num_train, "val": num_val, "val_relit": num_val, "test": num_test,
                      "test_same_light": num_test}
        if self.max_train_samples is not None:
            self.sizes["train"] = min(num_train, self.max_train_samples)
        if any(n < 1 for n in self.sizes.values()):
            raise CdistillError(f"Every split needs at least one scene; got sizes {self.sizes}.")
        self.train_lights = _sector(train_lights or {"azimuth": [-45, 45], "elevation": [30, 60], "tint": [0.3, 1]})
        self.test_lights = _sector(test_lights or {"azimuth": [135, 225], "elevation": [30, 60], "tint": [-1, -0.3]})
        self.num_concept_pairs = int(num_concept_pairs)
        self.root = root
        self.val_names: list[str] = ["val", "val_relit"]
        self.test_names: list[str] = ["test", "test_same_light"] + (["test_mit"] if root else [])
        self._splits: dict[str, IntrinsicDataset] = {}

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

    def split(self, name: str) -> IntrinsicDataset:
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
