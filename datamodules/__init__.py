"""LightningDataModules of the biased-MNIST benchmarks (ColorMNIST, DecoyMNIST, TextureMNIST)."""

from __future__ import annotations

from typing import Any

from cdistill.errors import unknown_name
from datamodules.biased_mnist import BiasedMNISTDataModule
from datamodules.color_mnist import PALETTE, ColorMNISTDataModule
from datamodules.dataset import BiasedDigitsDataset
from datamodules.decoy_mnist import DecoyMNISTDataModule
from datamodules.sampler import EpochSeededSampler
from datamodules.texture_mnist import TextureMNISTDataModule

#: Dataset name (the ``data=`` config choice) -> datamodule class.
DATAMODULES: dict[str, type[BiasedMNISTDataModule]] = {
    "color_mnist": ColorMNISTDataModule,
    "decoy_mnist": DecoyMNISTDataModule,
    "texture_mnist": TextureMNISTDataModule,
}


def create_datamodule(name: str, **kwargs: Any) -> BiasedMNISTDataModule:
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
    "BiasedDigitsDataset",
    "BiasedMNISTDataModule",
    "ColorMNISTDataModule",
    "DecoyMNISTDataModule",
    "EpochSeededSampler",
    "TextureMNISTDataModule",
    "create_datamodule",
]
