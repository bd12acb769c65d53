"""CelebA (Liu et al., 2015) in its released layout, read by the folder datamodule.

Under ``root``::

    img_align_celeba/<image_id>       000001.jpg ... (178x218 aligned faces)
    list_attr_celeba.csv              image_id, then 40 attributes in {-1, 1}
    list_eval_partition.csv           image_id,partition (0 train, 1 val, 2 test)

The target and the bias are two attributes (``target``, ``bias``; default ``Blond_Hair`` and
``Male``, the field's setting), each read as 1 where the attribute is 1 and 0 where it is -1.
``bias`` records the class the cue points to: by default (``bias_points_to=auto``) the pairing
most training faces agree with, so with Blond_Hair/Male ``bias = 1 - Male`` (women point to
blond, men to not blond) and blond men are bias-conflicting. The four (label, bias) groups give
the worst-group accuracy.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cdistill.errors import CdistillError, unknown_name
from datamodules.folder import FolderDataModule
from datamodules.folder_files import FolderRow, parse_int, read_csv
from datamodules.waterbirds import IMAGENET_MEAN, IMAGENET_STD, WILDS_SPLITS

log = logging.getLogger(__name__)
BIAS_POINTS_TO = ("auto", "same", "flipped")


def binary_attribute(value: str, column: str, where: str) -> int:
    """A CelebA attribute cell, ``1`` -> 1 and ``-1`` -> 0.

    Raises:
        CdistillError: Any other value, naming the row and column.
    """
    number = parse_int(value, column, where)
    if number not in (-1, 1):
        raise CdistillError(f"{where}: attribute {column!r} holds {value!r}; CelebA attributes are -1 or 1.")
    return int(number == 1)


class CelebADataModule(FolderDataModule):
    """CelebA from the released layout (see the module docstring); every other argument is
    :class:`~datamodules.folder.FolderDataModule`'s.

    Args:
        root: The folder holding ``img_align_celeba/`` and the two CSV files.
        target: The attribute to predict.
        bias: The spurious attribute.
        bias_points_to: ``auto`` (the pairing most training faces agree with), ``same``
            (attribute value ``v`` points to class ``v``) or ``flipped`` (to ``1 - v``).
        image_size: Side images are resized to (224).
        mean: Per-channel mean (default ImageNet's; None: from the train split).
        std: Per-channel std (likewise).
        check_images: Open every image's header at setup (off by default: 202,599 files).
        **kwargs: Passed to :class:`~datamodules.folder.FolderDataModule`.
    """

    name: str = "celeba"

    def __init__(self, root: str | None = None, target: str = "Blond_Hair", bias: str = "Male",
                 bias_points_to: str = "auto", image_size: int = 224,
                 mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD,
                 check_images: bool = False, **kwargs: Any) -> None:
        if bias_points_to not in BIAS_POINTS_TO:
            raise CdistillError(f"data.bias_points_to={bias_points_to!r}: use one of {BIAS_POINTS_TO}.")
        defaults: dict[str, Any] = {"num_classes": 2, "num_bias_groups": 2}
        kwargs = defaults | kwargs
        super().__init__(root=root, image_size=image_size, mean=mean, std=std, check_images=check_images, **kwargs)
        self.target, self.bias_attribute, self.bias_points_to = str(target), str(bias), str(bias_points_to)

    def _partitions(self, root: Path) -> dict[str, str]:
        rows, where = read_csv(root / "list_eval_partition.csv", {"path": "image_id", "split": "partition"})
        out = {}
        for row, w in zip(rows, where, strict=True):
            value = row["partition"].strip()
            if value not in WILDS_SPLITS:
                raise CdistillError(f"{w}: partition {value!r} is not 0, 1 or 2 (train, val, test).")
            out[row["image_id"].strip()] = WILDS_SPLITS[value]
        return out

    def _check_attributes(self, path: Path) -> None:
        with path.open(newline="") as f:
            header = [h.strip() for h in next(csv.reader(f), [])]
        for key, attr in (("target", self.target), ("bias", self.bias_attribute)):
            if attr not in header:
                raise unknown_name(f"CelebA attribute (data.{key})", attr, header[1:], f"Set data.{key}=<attribute>.")

    def read_rows(self) -> list[FolderRow]:
        """One row per line of ``list_attr_celeba.csv``, split by ``list_eval_partition.csv``."""
        root = self._root()
        attr_file = root / "list_attr_celeba.csv"
        if attr_file.is_file():
            self._check_attributes(attr_file)
        rows, where = read_csv(attr_file, {"path": "image_id"})
        split_of = self._partitions(root)
        raw: list[tuple[str, int, int, str, str]] = []
        for row, w in zip(rows, where, strict=True):
            image = row["image_id"].strip()
            if image not in split_of:
                raise CdistillError(f"{w}: image {image!r} has no row in list_eval_partition.csv. Add it or remove the row.")
            raw.append((image, binary_attribute(row[self.target], self.target, w),
                        binary_attribute(row[self.bias_attribute], self.bias_attribute, w), split_of[image], w))
        flip = self._flip([(y, b) for _, y, b, split, _ in raw if split == "train"])
        return [FolderRow(root / "img_align_celeba" / image, y, 1 - b if flip else b, split, w)
                for image, y, b, split, w in raw]

    def _flip(self, train: list[tuple[int, int]]) -> bool:
        """Whether ``bias = 1 - attribute``: as configured, or (``auto``) when most training
        faces pair attribute value ``v`` with class ``1 - v``."""
        if self.bias_points_to != "auto":
            return self.bias_points_to == "flipped"
        agree = sum(y == b for y, b in train)
        flip = 2 * agree < len(train)
        log.info("CelebA: %s %s points to %s (%d of %d training faces pair %s=v with %s=v)", self.bias_attribute,
                 "value v", "class 1-v" if flip else "class v", agree, len(train), self.bias_attribute, self.target)
        return flip
