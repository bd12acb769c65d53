"""Reading a folder dataset's files: the metadata CSV (its rows, integer cells and the errors that
name a bad row or column) and the images (read, converted and resized on access by one split's
:class:`FolderDataset`). The datamodule is :class:`datamodules.folder.FolderDataModule`."""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from cdistill.errors import CdistillError
from cdistill.utils.datamodule import SplitDataset

#: Pillow mode of each channel count (``data.channels``).
MODES = {1: "L", 3: "RGB"}


class FolderRow(NamedTuple):
    """One sample of the metadata: its image file, attributes, split, and where it was read
    (for error messages, e.g. ``metadata.csv line 7``)."""

    path: Path
    label: int
    bias: int
    split: str
    where: str


def parse_int(value: str, column: str, where: str, allow_empty: bool = False) -> int:
    """An integer cell (``"3"``, ``"3.0"``; empty -> -1 when ``allow_empty``).

    Raises:
        CdistillError: Naming the row, the column and the value.
    """
    text = value.strip()
    if allow_empty and text == "":
        return -1
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not number.is_integer():
        raise CdistillError(f"{where}: column {column!r} holds {value!r}, not an integer. Fix that row.")
    return int(number)


def read_csv(path: Path, required: Mapping[str, str]) -> tuple[list[dict[str, str]], list[str]]:
    """Rows of a CSV file as dicts, checking that the ``required`` columns (role -> column name)
    are in its header.

    Returns:
        ``(rows, where)``: the rows and, for each, ``"<file> line <n>"``.

    Raises:
        CdistillError: A missing file or a missing column (naming the present ones).
    """
    if not path.is_file():
        raise CdistillError(f"Metadata file {str(path)!r} does not exist; check data.root and data.metadata.")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        missing = {role: col for role, col in required.items() if col not in header}
        if missing:
            fixes = ", ".join(f"data.columns.{role}=<column>" for role in missing)
            raise CdistillError(
                f"{str(path)!r} has no column {', '.join(repr(c) for c in missing.values())} "
                f"(columns: {header}). Add the column, or name the one to use with {fixes}."
            )
        rows = list(reader)
    return rows, [f"{path.name} line {i + 2}" for i in range(len(rows))]


def open_image(path: Path, where: str, mode: str, size: int) -> Image.Image:
    """Read one image, converted to ``mode`` and resized to ``size`` x ``size`` (bilinear).

    Raises:
        CdistillError: An unreadable file, naming it and its metadata row.
    """
    try:
        with Image.open(path) as im:
            out = im.convert(mode)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise CdistillError(
            f"Cannot read image {str(path)!r} ({where}): {err}. Replace the file or remove its row."
        ) from err
    if out.size != (size, size):
        out = out.resize((size, size), Image.Resampling.BILINEAR)
    return out


def image_tensor(im: Image.Image) -> Tensor:
    """``uint8 [C, H, W]`` from a Pillow image in mode ``L`` or ``RGB``."""
    arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class FolderDataset(SplitDataset):
    """The rows of one split, read from disk on access and normalised.

    Args:
        rows: The split's samples.
        image_size: Side every image is resized to.
        channels: 1 or 3.
        mean: ``float32 [C]`` per-channel mean (``[0, 1]`` units).
        std: ``float32 [C]`` per-channel std.
        transform: Applied to the ``uint8 [C, H, W]`` image before normalisation (augmentation,
            train split only), or None.
    """

    def __init__(self, rows: Sequence[FolderRow], image_size: int, channels: int, mean: Tensor, std: Tensor,
                 transform: Callable[[Tensor], Tensor] | None = None) -> None:
        self.rows = list(rows)
        self.image_size, self.mode = int(image_size), MODES[channels]
        self.labels = torch.tensor([r.label for r in self.rows], dtype=torch.int64)
        self.bias = torch.tensor([r.bias for r in self.rows], dtype=torch.int64)
        self.mean = mean.to(torch.float32).view(-1, 1, 1)  # [C, 1, 1]: broadcasts over [C, H, W]
        self.std = std.to(torch.float32).view(-1, 1, 1)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def files(self) -> list[Path]:
        """The image file of each sample."""
        return [r.path for r in self.rows]

    def raw(self, index: int) -> Tensor:
        """Image ``index`` as ``uint8 [C, image_size, image_size]`` (no augmentation)."""
        row = self.rows[index]
        return image_tensor(open_image(row.path, row.where, self.mode, self.image_size))

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        """``{"image": float32 [C, S, S], "label", "bias", "index": int64 []}``."""
        image = self.raw(index)
        if self.transform is not None:
            image = self.transform(image)
        x = (image.to(torch.float32) / 255.0 - self.mean) / self.std
        return {"image": x, "label": self.labels[index], "bias": self.bias[index],
                "index": torch.tensor(index, dtype=torch.int64)}
