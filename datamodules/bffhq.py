"""BFFHQ (biased FFHQ): age classification with gender as the spurious cue, read from disk.

The released layout under ``root``::

    <pct>/align/<label>/*.png      bias-aligned training faces (pct: 0.5pct, 1pct, ...)
    <pct>/conflict/<label>/*.png   bias-conflicting training faces
    valid/*.png                    validation faces
    test/*.png                     test faces (unbiased)

File names end in ``_<age>_<gender>.png``: the target is age (0 young, 1 old), the bias is
gender (0 female, 1 male). In training, young faces are mostly female and old faces mostly
male, so gender ``g`` points to class ``g``: ``bias = gender`` and a face is aligned when
``bias == label``. (If the ``align`` folder says the opposite, the mapping is flipped: see
:func:`bias_mapping`.)

Splits (batches ``{"image", "label", "bias", "index"}`` like the MNIST datamodules):

* ``train``: align + conflict (the conflict folder optionally subsampled,
  ``conflict_fraction``);
* ``val``: all of ``valid/``. BFFHQ ships no in-distribution validation split, so the
  ``strict`` protocol (``val/acc``) selects on the released validation set as it is;
* ``val_reversed``: the bias-conflicting part of ``valid/``: selecting on it is the paper's
  protocol (``val_reversed/acc``, validation data with the test-time bias shift);
* ``test``: all of ``test/``; its aligned and conflicting parts are reported by the metrics
  (``test/acc``, ``test/acc_aligned``, ``test/acc_conflicting``).
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from cdistill.errors import CdistillError, unknown_name
from cdistill.utils.datamodule import SplitDataset
from datamodules.biased_mnist import channel_stats
from datamodules.loaders import SplitDataModule
from datamodules.normalization import ChannelNormalization
from datamodules.splits import seeded_subset

log = logging.getLogger(__name__)
NAME_RE = re.compile(r"^.+_(?P<age>[01])_(?P<gender>[01])$")
SUFFIXES = (".png", ".jpg", ".jpeg")


class FaceRecord(NamedTuple):
    """One image file and the attributes in its name."""

    path: Path
    age: int
    gender: int


class FaceDataset(SplitDataset):
    """Images kept as ``uint8`` and normalised on access.

    Args:
        images: ``uint8 [N, 3, H, W]``.
        labels: ``int64 [N]`` age (the target).
        bias: ``int64 [N]`` the class the gender cue points to.
        mean: ``float32 [3]`` per-channel mean of the train split, ``[0, 1]`` units.
        std: ``float32 [3]`` per-channel std of the train split.
        files: The source file of each image (for provenance).
    """

    def __init__(self, images: Tensor, labels: Tensor, bias: Tensor, mean: Tensor, std: Tensor,
                 files: list[Path]) -> None:
        self.images, self.labels, self.bias, self.files = images, labels, bias, files
        self.mean = mean.to(torch.float32).view(-1, 1, 1)  # [C, 1, 1]: broadcasts over [C, H, W]
        self.std = std.to(torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """``{"image": float32 [3, H, W], "label", "bias", "index": int64 []}``."""
        image = (self.images[index].to(torch.float32) / 255.0 - self.mean) / self.std
        return {"image": image, "label": self.labels[index], "bias": self.bias[index],
                "index": torch.tensor(index, dtype=torch.int64)}


def list_faces(folder: Path) -> list[FaceRecord]:
    """Parse the image files of one folder (sorted by name; hidden files are skipped).

    Raises:
        CdistillError: Missing or empty folder, or a file whose name is not
            ``*_<age>_<gender>.<png|jpg>`` (named).
    """
    if not folder.is_dir():
        raise CdistillError(f"BFFHQ folder {str(folder)!r} does not exist; check data.root and data.pct.")
    records = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        match = NAME_RE.match(path.stem)
        if path.suffix.lower() not in SUFFIXES or match is None:
            raise CdistillError(
                f"Cannot parse BFFHQ file name {str(path)!r}: expected *_<age>_<gender>.png "
                "with age and gender 0 or 1."
            )
        records.append(FaceRecord(path, int(match["age"]), int(match["gender"])))
    if not records:
        raise CdistillError(f"BFFHQ folder {str(folder)!r} holds no images.")
    return records


def load_images(records: list[FaceRecord], size: int | None) -> Tensor:
    """Read images as RGB, resized to ``size`` (bilinear) when given.

    Non-RGB images (grey, RGBA, palette) are converted to RGB (logged once per call).

    Returns:
        ``uint8 [N, 3, H, W]``.

    Raises:
        CdistillError: An unreadable file, or (``size`` None) images of different sizes; the
            file is named.
    """
    out: list[np.ndarray] = []
    first: tuple[Path, tuple[int, int]] | None = None
    converted: Counter[str] = Counter()
    for rec in records:
        try:
            with Image.open(rec.path) as im:
                if im.mode != "RGB":
                    converted[im.mode] += 1
                rgb = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise CdistillError(f"Cannot read BFFHQ image {str(rec.path)!r}: {err}") from err
        if size is not None:
            rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
        elif first is None:
            first = (rec.path, rgb.size)
        elif rgb.size != first[1]:
            raise CdistillError(
                f"BFFHQ image {str(rec.path)!r} is {rgb.size[0]}x{rgb.size[1]} but "
                f"{str(first[0])!r} is {first[1][0]}x{first[1][1]}; set data.image_size to resize all."
            )
        out.append(np.asarray(rgb, dtype=np.uint8))
    if converted:
        log.info("converted %s images to RGB (modes: %s)", sum(converted.values()), dict(converted))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def bias_mapping(align: list[FaceRecord]) -> bool:
    """Whether ``bias = gender`` (True) or ``1 - gender`` (False), read off the align folder:
    in aligned faces the gender cue points to the age class. Warns about faces that disagree."""
    same = sum(r.age == r.gender for r in align)
    direct = same * 2 >= len(align)
    odd = len(align) - same if direct else same
    if odd:
        log.warning("%d of %d faces in the align folder disagree with the majority age-gender pairing", odd, len(align))
    return direct


class BFFHQDataModule(ChannelNormalization, SplitDataModule):
    """BFFHQ read from the released layout (see the module docstring).

    Args:
        root: Dataset root (holds ``<pct>/``, ``valid/``, ``test/``); required once the data
            are read.
        pct: Name of the training folder, i.e. the conflicting ratio (``0.5pct``, ``1pct``,
            ``2pct``, ``5pct`` where present).
        conflict_fraction: Keep this fraction of the conflict folder (seeded subset) to lower
            the conflicting ratio further; 1.0 keeps all.
        image_size: Side images are resized to on load (64-224 typical); ``None`` keeps the
            files' size, which must then be the same for all.
        **loader: :class:`~datamodules.loaders.LoaderSettings` (``seed`` also seeds the
            conflict subset; ``max_train_samples`` takes a seeded random subset).
    """

    name: str = "bffhq"
    num_channels: int = 3
    num_classes: int = 2
    num_bias_groups: int = 2
    #: Not declared for the released data (see ``BiasedMNISTDataModule.random_cue_split``).
    random_cue_split: str | None = None

    def __init__(
        self,
        root: str | None = None,
        pct: str = "0.5pct",
        conflict_fraction: float = 1.0,
        image_size: int | None = 64,
        **loader: Any,
    ) -> None:
        super().__init__(**loader)
        self.save_hyperparameters()
        if not 0.0 <= float(conflict_fraction) <= 1.0:
            raise CdistillError(f"data.conflict_fraction={conflict_fraction} must be in [0, 1].")
        if image_size is not None and int(image_size) < 8:
            raise CdistillError(f"data.image_size={image_size} is too small; use 64-224 (or null).")
        # A missing root fails when the data are first needed, so configs compose without one.
        self.root = Path(str(root)).expanduser() if root else None
        self.pct = str(pct)
        self.conflict_fraction = float(conflict_fraction)
        self._image_size = None if image_size is None else int(image_size)
        self.val_names: list[str] = ["val", "val_reversed"]
        self.test_names: list[str] = ["test"]
        #: ``val_reversed`` is the conflicting part of ``val`` (a held-out set drawn from both uses val alone).
        self.val_reversed_in_val = True
        self._datasets: dict[str, FaceDataset] = {}
        self._direct = True  # bias = gender (see bias_mapping); set when the files are listed
        self._mean: Tensor | None = None
        self._std: Tensor | None = None

    # ----------------------------------------------------------------- building
    @property
    def split_names(self) -> list[str]:
        """All split names, train first."""
        return ["train", *self.val_names, *self.test_names]

    def _records(self) -> dict[str, list[FaceRecord]]:
        """Files of every split (before reading any image), and the bias mapping check."""
        if self.root is None:
            raise CdistillError("data.root is not set: give the BFFHQ folder (holding 0.5pct/, valid/, test/).")
        base = self.root / self.pct
        if not base.is_dir():
            present = sorted(p.name for p in self.root.glob("*pct")) if self.root.is_dir() else []
            raise CdistillError(
                f"BFFHQ training folder {str(base)!r} does not exist (data.root={str(self.root)!r}, "
                f"data.pct={self.pct!r}; present: {present or 'none'})."
            )
        align = [r for label in (0, 1) for r in self._label_folder(base / "align", label)]
        conflict = [r for label in (0, 1) for r in self._label_folder(base / "conflict", label, allow_empty=True)]
        if self.conflict_fraction < 1.0 and conflict:
            keep = round(len(conflict) * self.conflict_fraction)
            conflict = seeded_subset(conflict, keep, self.seed, "bffhq", "conflict")
        self._direct = bias_mapping(align)
        train = align + conflict
        if self.max_train_samples is not None and self.max_train_samples < len(train):
            train = seeded_subset(train, self.max_train_samples, self.seed, "bffhq", "cap")
        valid = list_faces(self.root / "valid")
        return {"train": train, "val": valid,
                "val_reversed": [r for r in valid if self._bias(r) != r.age],
                "test": list_faces(self.root / "test")}

    def _label_folder(self, folder: Path, label: int, allow_empty: bool = False) -> list[FaceRecord]:
        path = folder / str(label)
        if allow_empty and not (path.is_dir() and any(path.iterdir())):
            return []
        records = list_faces(path)
        for r in records:
            if r.age != label:
                raise CdistillError(f"BFFHQ file {str(r.path)!r} has age {r.age} in its name but lies in folder {label}.")
        return records

    def _bias(self, rec: FaceRecord) -> int:
        return rec.gender if self._direct else 1 - rec.gender

    def setup(self, stage: str | None = None) -> None:
        """Read every split once (uint8 in memory); later calls are no-ops."""
        if self._datasets:
            return
        records = self._records()
        if not records["val_reversed"]:
            raise CdistillError(f"{str(records['val'][0].path.parent)!r} holds no bias-conflicting faces: val_reversed is empty.")
        images = {s: load_images(r, self._image_size) for s, r in records.items() if s != "val_reversed"}
        shapes = {s: tuple(x.shape[2:]) for s, x in images.items()}
        if len(set(shapes.values())) > 1:
            raise CdistillError(f"BFFHQ splits have different image sizes {shapes}; set data.image_size.")
        conflicting = torch.tensor([self._bias(r) != r.age for r in records["val"]])
        images["val_reversed"] = images["val"][conflicting]
        self._mean, self._std = channel_stats(images["train"])
        self._datasets = {
            s: FaceDataset(images[s], torch.tensor([r.age for r in recs], dtype=torch.int64),
                           torch.tensor([self._bias(r) for r in recs], dtype=torch.int64),
                           self._mean, self._std, [r.path for r in recs])
            for s, recs in records.items()
        }
        train = self._datasets["train"]
        n_conf = int((train.bias != train.labels).sum())
        log.info("BFFHQ %s: train %d (%d conflicting, %.2f%%), val %d, val_reversed %d, test %d",
                 self.root, len(train), n_conf, 100 * n_conf / len(train),
                 *(len(self._datasets[s]) for s in ("val", "val_reversed", "test")))

    # ----------------------------------------------------------------- access
    @property
    def image_size(self) -> int:
        """Side of the images the model sees (``data.image_size``, or the files' size)."""
        if self._image_size is not None:
            return self._image_size
        return int(self.split("train").images.shape[-1])

    def split(self, name: str) -> FaceDataset:
        """The dataset of split ``name`` (reads the data on first use).

        Raises:
            CdistillError: For an unknown split, listing the valid names.
        """
        if name not in self.split_names:
            raise unknown_name(f"{self.name} split", name, self.split_names, f"Use one of: {', '.join(self.split_names)}.")
        self.setup()
        return self._datasets[name]
