"""Any biased image dataset on disk: a folder of images plus a ``metadata.csv``.

The layout under ``root``::

    metadata.csv        one row per image: path,label,bias,split (column names configurable)
    <any path>          the images, any format Pillow reads, any size and mode

* ``path``: the image file, relative to ``root``;
* ``label``: the target class, an integer in ``[0, num_classes)``;
* ``bias``: the class the spurious cue points to under the training correlation (so a sample is
  bias-aligned when ``bias == label``), or ``-1`` (or empty) when unknown;
* ``split``: ``train``, ``val``, ``val_reversed``, ``test``, or any other name, which becomes an
  extra test split, logged as ``<name>/...`` when the name starts with ``test`` and as
  ``test_<name>/...`` otherwise (the test stage reports the splits whose name starts with ``test``).

``train``, ``val`` and ``test`` must exist. Without a ``val_reversed`` split, the bias-conflicting
part of ``val`` takes its role (as BFFHQ does), so the ``paper`` protocol selects on validation
data with the test-time bias shift. Images are read on access (never all in memory), resized to
``image_size`` x ``image_size`` (bilinear; the aspect ratio is not kept) and converted to
``channels`` (1: Pillow ``L``, 3: ``RGB``). Batches are ``{"image", "label", "bias", "index"}``
like every other datamodule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import hydra.utils
import torch
from omegaconf import Container, OmegaConf
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from cdistill.errors import CdistillError, unknown_name
from datamodules.biased_mnist import channel_stats
from datamodules.folder_files import (
    MODES,
    FolderDataset,
    FolderRow,
    image_tensor,
    open_image,
    parse_int,
    read_csv,
)
from datamodules.loaders import SplitDataModule
from datamodules.normalization import ChannelNormalization
from datamodules.splits import seeded_subset

log = logging.getLogger(__name__)
#: Roles of the metadata columns; ``data.columns.<role>`` names the column that holds each.
COLUMN_ROLES = ("path", "label", "bias", "split")
#: Splits the tasks need; every other name is an extra test split.
REQUIRED_SPLITS = ("train", "val", "test")
KNOWN_SPLITS = (*REQUIRED_SPLITS, "val_reversed")


def extra_split_name(name: str) -> str:
    """The name a split is served under: the known ones as they are, any other prefixed with
    ``test_`` unless it starts with ``test`` already (e.g. ``ood`` -> ``test_ood``)."""
    return name if name in KNOWN_SPLITS or name.startswith("test") else f"test_{name}"


def build_transform(augment: Sequence[Any] | None) -> Callable[[Tensor], Tensor] | None:
    """A ``torchvision.transforms.v2.Compose`` of ``augment``: transform objects, or Hydra configs
    with ``_target_`` (e.g. ``{_target_: torchvision.transforms.v2.RandomHorizontalFlip}``)."""
    if not augment:
        return None
    from torchvision.transforms import v2

    steps = [hydra.utils.instantiate(t) if isinstance(t, Mapping) or hasattr(t, "_target_") else t for t in augment]
    for step in steps:
        if not callable(step):
            raise CdistillError(f"data.augment holds {step!r}, not a transform: give {{_target_: torchvision.transforms.v2.<Name>, ...}}.")
    return v2.Compose(steps)


class FolderDataModule(ChannelNormalization, SplitDataModule):
    """A biased dataset read from ``root`` and its metadata CSV (see the module docstring).

    Args:
        root: Folder holding the metadata file and the images (relative paths resolve here);
            required once the data are read.
        metadata: The metadata file, relative to ``root``.
        columns: Role (``path``, ``label``, ``bias``, ``split``) -> column name, for the roles
            whose column is not named after the role.
        split_map: Raw split value -> split name (e.g. ``{"0": train, "1": val, "2": test}``);
            values not in it are used as they are.
        num_classes: Number of classes; labels must lie in ``[0, num_classes)``.
        num_bias_groups: Number of bias values (None: ``num_classes``); bias in
            ``[-1, num_bias_groups)``.
        image_size: Side images are resized to.
        channels: 1 (grey) or 3 (RGB); images are converted.
        mean: Per-channel mean in ``[0, 1]`` units (None: from the train split).
        std: Per-channel std (None: from the train split).
        stats_samples: At most this many train images (a seeded subset) give the mean and std.
        augment: Train-time transforms (torchvision ``transforms.v2``) on the ``uint8 [C, H, W]``
            image, as objects or Hydra configs; None for none.
        check_images: At setup, open every image's header, so an unreadable file fails before
            training rather than mid-epoch.
        random_cue_split: The test split (as served, e.g. ``test`` or ``test_ood``) whose cue is
            drawn independently of the label, if any (``benchmarks/compare.py`` reports its
            accuracy as the random-cue column); None: none.
        **loader: :class:`~datamodules.loaders.LoaderSettings` (``seed`` also seeds the
            statistics subset; ``max_train_samples`` takes a seeded subset).
    """

    name: str = "folder"
    #: See :attr:`datamodules.biased_mnist.BiasedMNISTDataModule.random_cue_split`; set per dataset here.
    random_cue_split: str | None = None

    def __init__(
        self,
        root: str | None = None,
        metadata: str = "metadata.csv",
        columns: Mapping[str, str] | None = None,
        split_map: Mapping[Any, str] | None = None,
        num_classes: int = 2,
        num_bias_groups: int | None = None,
        image_size: int = 64,
        channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        stats_samples: int = 5000,
        augment: Sequence[Any] | None = None,
        check_images: bool = True,
        random_cue_split: str | None = None,
        **loader: Any,
    ) -> None:
        super().__init__(**loader)
        self.save_hyperparameters(ignore=["augment"])
        # Hydra passes mappings and lists as DictConfig/ListConfig; checkpoints store these
        # hparams, and must hold plain ones to load with torch.load(weights_only=True).
        for key, value in list(self.hparams.items()):
            if isinstance(value, Container):
                self.hparams[key] = OmegaConf.to_container(value, resolve=True)
        self._check_settings(columns, num_classes, image_size, channels)
        # A missing root fails when the data are first needed, so configs compose without one.
        self.root = Path(str(root)).expanduser() if root else None
        self.metadata = str(metadata)
        self.columns = {role: role for role in COLUMN_ROLES} | {k: str(v) for k, v in dict(columns or {}).items()}
        self.split_map = {str(k): str(v) for k, v in dict(split_map or {}).items()}
        self.num_classes = int(num_classes)
        self.num_bias_groups = self.num_classes if num_bias_groups is None else int(num_bias_groups)
        self.image_size, self.num_channels = int(image_size), int(channels)
        self._given_stats = self._check_stats(mean, std)
        self.stats_samples = int(stats_samples)
        self.transform = build_transform(augment)
        self.check_images = bool(check_images)
        self.random_cue_split = None if random_cue_split in (None, "") else str(random_cue_split)
        self.val_names: list[str] = ["val", "val_reversed"]
        #: True when ``val_reversed`` is the conflicting part of ``val`` (no rows of its own in the
        #: metadata): a held-out set drawn from both then uses ``val`` alone.
        self.val_reversed_in_val = False
        self.test_names: list[str] = ["test"]
        self._datasets: dict[str, FolderDataset] = {}
        self._mean: Tensor | None = None
        self._std: Tensor | None = None

    # ----------------------------------------------------------------- settings
    @staticmethod
    def _check_settings(columns: Mapping[str, str] | None, num_classes: int, image_size: int, channels: int) -> None:
        for role in dict(columns or {}):
            if role not in COLUMN_ROLES:
                raise unknown_name("data.columns role", str(role), COLUMN_ROLES, "Use data.columns.<role>=<column>.")
        if int(channels) not in MODES:
            raise CdistillError(f"data.channels={channels}: use 1 (grey) or 3 (RGB).")
        if int(num_classes) < 2:
            raise CdistillError(f"data.num_classes={num_classes} must be >= 2.")
        if int(image_size) < 8:
            raise CdistillError(f"data.image_size={image_size} is too small; use 8 or more (e.g. 64 or 224).")

    def _check_stats(self, mean: Sequence[float] | None, std: Sequence[float] | None) -> tuple[Tensor, Tensor] | None:
        if (mean is None) != (std is None):
            raise CdistillError("Give both data.mean and data.std, or neither (then the train split gives them).")
        if mean is None or std is None:
            return None
        m, s = torch.tensor(list(mean), dtype=torch.float32), torch.tensor(list(std), dtype=torch.float32)
        if m.shape != (self.num_channels,) or s.shape != (self.num_channels,) or bool((s <= 0).any()):
            raise CdistillError(
                f"data.mean={list(mean)} and data.std={list(std)} need {self.num_channels} values each "
                f"(data.channels={self.num_channels}), std > 0."
            )
        return m, s

    # ----------------------------------------------------------------- reading
    @property
    def split_names(self) -> list[str]:
        """All split names, train first."""
        return ["train", *self.val_names, *self.test_names]

    def _root(self) -> Path:
        if self.root is None:
            raise CdistillError(f"data.root is not set: give the folder holding {self.metadata} and the images.")
        if not self.root.is_dir():
            raise CdistillError(f"data.root={str(self.root)!r} is not a folder.")
        return self.root

    def read_rows(self) -> list[FolderRow]:
        """Every sample of the metadata (subclasses read other layouts here)."""
        root = self._root()
        rows, where = read_csv(root / self.metadata, self.columns)
        c = self.columns
        return [
            FolderRow(root / row[c["path"]].strip(), parse_int(row[c["label"]] or "", c["label"], w),
                      parse_int(row[c["bias"]] or "", c["bias"], w, allow_empty=True),
                      self.split_map.get(str(row[c["split"]]).strip(), str(row[c["split"]]).strip()), w)
            for row, w in zip(rows, where, strict=True)
        ]

    def _check_row(self, row: FolderRow) -> None:
        if not 0 <= row.label < self.num_classes:
            raise CdistillError(
                f"{row.where}: label {row.label} is outside [0, {self.num_classes}) (data.num_classes="
                f"{self.num_classes}). Fix the row, or set data.num_classes (and model.num_classes) to cover it."
            )
        if not -1 <= row.bias < self.num_bias_groups:
            raise CdistillError(
                f"{row.where}: bias {row.bias} is outside [-1, {self.num_bias_groups}) (-1: unknown). Fix the "
                "row, or set data.num_bias_groups (and model.num_bias_groups) to cover it."
            )
        if not row.path.is_file():
            raise CdistillError(f"{row.where}: image {str(row.path)!r} does not exist. Fix the path (relative to data.root).")
        if self.check_images:
            try:
                with Image.open(row.path) as im:
                    im.size  # noqa: B018 - reading the header is the check
            except (UnidentifiedImageError, OSError) as err:
                raise CdistillError(
                    f"Cannot read image {str(row.path)!r} ({row.where}): {err}. Replace the file or remove its row."
                ) from err

    def _by_split(self, rows: list[FolderRow]) -> dict[str, list[FolderRow]]:
        """Rows grouped by split; the required ones must be there, and ``val_reversed`` is
        the conflicting part of ``val`` when the metadata has none."""
        splits: dict[str, list[FolderRow]] = {}
        for row in rows:
            splits.setdefault(extra_split_name(row.split), []).append(row)
        missing = [s for s in REQUIRED_SPLITS if not splits.get(s)]
        if missing:
            present = {k: len(v) for k, v in splits.items()}
            raise CdistillError(
                f"{self.metadata} has no rows of split {missing} (present: {present}); the column "
                f"{self.columns['split']!r} must name train, val and test (extra names become extra test "
                "splits). Rename the splits, or map raw values with data.split_map={'<raw>': '<name>'}."
            )
        if "val_reversed" not in splits:
            conflicting = [r for r in splits["val"] if r.bias >= 0 and r.bias != r.label]
            if conflicting:
                splits["val_reversed"] = conflicting
                self.val_reversed_in_val = True
        return splits

    def _cap_train(self, train: list[FolderRow]) -> list[FolderRow]:
        if self.max_train_samples is None or self.max_train_samples >= len(train):
            return train
        return seeded_subset(train, self.max_train_samples, self.seed, "folder", "cap")

    def _stats(self, train: list[FolderRow]) -> tuple[Tensor, Tensor]:
        """Mean and std of (a seeded subset of at most ``stats_samples``) train images."""
        if self._given_stats is not None:
            return self._given_stats
        keep = seeded_subset(train, self.stats_samples, self.seed, "folder", "stats")
        images = torch.stack([image_tensor(open_image(row.path, row.where, MODES[self.num_channels], self.image_size))
                              for row in keep])
        return channel_stats(images)

    def setup(self, stage: str | None = None) -> None:
        """Read and check the metadata once (images are read on access); later calls are no-ops."""
        if self._datasets:
            return
        rows = self.read_rows()
        for row in rows:
            self._check_row(row)
        splits = self._by_split(rows)
        splits["train"] = self._cap_train(splits["train"])
        self.val_names = [s for s in ("val", "val_reversed") if s in splits]
        self.test_names = ["test", *[s for s in splits if s not in KNOWN_SPLITS]]
        if self.random_cue_split is not None and self.random_cue_split not in self.test_names:
            raise unknown_name("data.random_cue_split", self.random_cue_split, self.test_names,
                               "Name a test split whose cue is independent of the label, or set it to null.")
        self._mean, self._std = self._stats(splits["train"])
        self._datasets = {
            name: FolderDataset(rows_, self.image_size, self.num_channels, self._mean, self._std,
                                self.transform if name == "train" else None)
            for name, rows_ in splits.items()
        }
        log.info("%s %s: %s", self.name, self.root, ", ".join(f"{k} {len(v)}" for k, v in self._datasets.items()))

    # ----------------------------------------------------------------- access
    def split(self, name: str) -> FolderDataset:
        """The dataset of split ``name`` (reads the metadata on first use).

        Raises:
            CdistillError: For an unknown split, listing the valid names.
        """
        self.setup()
        if name not in self._datasets:
            raise unknown_name(f"{self.name} split", name, self.split_names, f"Use one of: {', '.join(self.split_names)}.")
        return self._datasets[name]

