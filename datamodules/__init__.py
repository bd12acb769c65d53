"""LightningDataModules: the biased-MNIST benchmarks (ColorMNIST, DecoyMNIST, TextureMNIST,
MarkerMNIST), the faces (BFFHQ read from disk, and its drawn offline proxy), and any dataset given
as a folder of images with a metadata CSV (``folder``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl

from cdistill.errors import unknown_name
from datamodules.bffhq import BFFHQDataModule
from datamodules.biased_mnist import BiasedMNISTDataModule
from datamodules.celeba import CelebADataModule
from datamodules.color_mnist import PALETTE, ColorMNISTDataModule
from datamodules.dataset import BiasedDigitsDataset
from datamodules.decoy_mnist import DecoyMNISTDataModule
from datamodules.faces_proxy import FacesProxyDataModule
from datamodules.folder import FolderDataModule
from datamodules.marker_mnist import MarkerMNISTDataModule
from datamodules.sampler import EpochSeededSampler
from datamodules.texture_mnist import TextureMNISTDataModule
from datamodules.waterbirds import WaterbirdsDataModule

#: Dataset name (the ``data=`` config choice) -> datamodule class.
DATAMODULES: dict[str, type[pl.LightningDataModule]] = {
    "color_mnist": ColorMNISTDataModule,
    "decoy_mnist": DecoyMNISTDataModule,
    "texture_mnist": TextureMNISTDataModule,
    "marker_mnist": MarkerMNISTDataModule,
    "bffhq": BFFHQDataModule,
    "faces_proxy": FacesProxyDataModule,
    "folder": FolderDataModule,
    "waterbirds": WaterbirdsDataModule,
    "celeba": CelebADataModule,
}


def create_datamodule(name: str, **kwargs: Any) -> pl.LightningDataModule:
    """Build the datamodule registered as ``name`` with constructor ``kwargs``.

    Raises:
        CdistillError: For an unknown name, listing close or valid names.
    """
    if name not in DATAMODULES:
        raise unknown_name("dataset", name, DATAMODULES.keys(), "Set data=<one of them>.")
    return DATAMODULES[name](**kwargs)


__all__ = [
    "DATAMODULES",
    "PALETTE",
    "BFFHQDataModule",
    "BiasedDigitsDataset",
    "BiasedMNISTDataModule",
    "CelebADataModule",
    "ColorMNISTDataModule",
    "DecoyMNISTDataModule",
    "EpochSeededSampler",
    "FacesProxyDataModule",
    "FolderDataModule",
    "MarkerMNISTDataModule",
    "TextureMNISTDataModule",
    "WaterbirdsDataModule",
    "create_datamodule",
]

if TYPE_CHECKING:  # mypy checks every datamodule against the contract cdistill types its data by
    from cdistill.utils.datamodule import ConceptPairData, ImageData
    from datamodules.intrinsic import IntrinsicDataModule

    _IMAGE_DATA: tuple[type[ImageData], ...] = (
        BFFHQDataModule, CelebADataModule, ColorMNISTDataModule, DecoyMNISTDataModule, FacesProxyDataModule,
        FolderDataModule, MarkerMNISTDataModule, TextureMNISTDataModule, WaterbirdsDataModule,
    )
    _CONCEPT_PAIR_DATA: type[ConceptPairData] = IntrinsicDataModule
