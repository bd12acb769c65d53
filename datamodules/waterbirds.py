"""Waterbirds (Sagawa et al., 2020) in the WILDS layout, read by the folder datamodule.

Under ``root``::

    metadata.csv                  img_id,img_filename,y,split,place,place_filename
    <img_filename>                e.g. 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg

The target ``y`` is the bird type (0 landbird, 1 waterbird) and the bias ``place`` the background
(0 land, 1 water): a water background points to the waterbird class, so ``bias = place`` and a
bird on its own kind of background is bias-aligned. ``split`` 0/1/2 is train/val/test (the released
splits: train 95% aligned; val and test balanced in place within each bird type). The four
(label, bias) groups give the worst-group accuracy the field reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datamodules.folder import FolderDataModule

#: torchvision's ImageNet statistics: the normalisation of ImageNet-pretrained students.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: WILDS column names of the roles the folder datamodule reads.
WILDS_COLUMNS = {"path": "img_filename", "label": "y", "bias": "place", "split": "split"}
WILDS_SPLITS = {"0": "train", "1": "val", "2": "test"}


class WaterbirdsDataModule(FolderDataModule):
    """Waterbirds from the WILDS layout (see the module docstring); every other argument is
    :class:`~datamodules.folder.FolderDataModule`'s.

    Args:
        root: The dataset folder (``waterbird_complete95_forest2water2`` in the WILDS download).
        image_size: Side images are resized to (224, the field's).
        mean: Per-channel mean (default ImageNet's, for ImageNet-pretrained students; None: from
            the train split).
        std: Per-channel std (likewise).
        **kwargs: Passed to :class:`~datamodules.folder.FolderDataModule`.
    """

    name: str = "waterbirds"

    def __init__(self, root: str | None = None, image_size: int = 224,
                 mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD,
                 **kwargs: Any) -> None:
        defaults: dict[str, Any] = {"columns": WILDS_COLUMNS, "split_map": WILDS_SPLITS, "num_classes": 2,
                                    "num_bias_groups": 2}
        kwargs = defaults | kwargs
        super().__init__(root=root, image_size=image_size, mean=mean, std=std, **kwargs)
