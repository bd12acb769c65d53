"""What the tasks read from a datamodule, as typed protocols.

``cdistill`` never imports ``datamodules``: the tasks, fitters and command-line tools type their
datamodule by these protocols instead, and every datamodule in ``datamodules/`` satisfies them
(checked by ``tests/datamodules/test_contract.py``). Any other ``LightningDataModule`` with these
members works too.

* :class:`SplitData`: named splits (:class:`SplitDataset`) of dict batches, the loaders' batch sizes and the image shape;
  what every task needs.
* :class:`ImageData`: also the normalisation (the train split's pixel statistics) and the number
  of classes; what the concept terms, probes and reliance reports need (the biased-image
  datamodules).
* :class:`ConceptPairData`: also rendered concept pairs; what the intrinsic task needs.
"""

from __future__ import annotations

from collections.abc import Sequence, Sized
from typing import Protocol, cast, runtime_checkable

from torch import Tensor
from torch.utils.data import Dataset

from cdistill.errors import CdistillError


class SplitDataset(Dataset[dict[str, Tensor]], Sized):
    """One split: a map-style dataset of sized length whose samples are dicts of tensors
    (``"image"``, ``"index"`` and the datamodule's targets). The datasets of ``datamodules/``
    derive from it, so ``len()``, samplers and loaders type-check on any split."""


@runtime_checkable
class SplitData(Protocol):
    """Named splits of dict samples whose ``"image"`` is ``float32 [C, image_size, image_size]``.

    Members are read-only properties here, so a class attribute, an instance attribute or a
    property all satisfy them.

    Attributes:
        num_channels: ``C``, the channels of every image.
        image_size: Side of the square images the model sees.
        batch_size: Train batch size (per process under DDP).
        eval_batch_size: Batch size of the evaluation loaders.
        val_names: The validation splits, in the order of the validation loaders.
        test_names: The test splits, in the order of the test loaders.
    """

    @property
    def num_channels(self) -> int: ...
    @property
    def image_size(self) -> int: ...
    @property
    def batch_size(self) -> int: ...
    @property
    def eval_batch_size(self) -> int: ...
    @property
    def val_names(self) -> Sequence[str]: ...
    @property
    def test_names(self) -> Sequence[str]: ...

    def setup(self, stage: str | None = None) -> None:
        """Build or read the splits; idempotent."""

    def split(self, name: str) -> SplitDataset:
        """The dataset of split ``name`` (``train``, a val or a test name; set up on first use)."""


@runtime_checkable
class ImageData(SplitData, Protocol):
    """Split data whose images are normalised per channel by the train split's statistics, with
    a ``"label"`` and a ``"bias"`` in every sample.

    Attributes:
        num_classes: Number of target classes (labels lie in ``[0, num_classes)``).
        mean: ``float32 [C]`` per-channel pixel mean, in ``[0, 1]`` units.
        std: ``float32 [C]`` per-channel pixel std, in ``[0, 1]`` units.
    """

    @property
    def num_classes(self) -> int: ...

    def normalize(self, x: Tensor) -> Tensor:
        """Map ``[..., C, H, W]`` images in ``[0, 1]`` to the normalised space the model sees."""

    @property
    def mean(self) -> Tensor: ...
    @property
    def std(self) -> Tensor: ...


@runtime_checkable
class ConceptPairData(SplitData, Protocol):
    """Split data that renders its own concept sets as pairs of images."""

    def concept_pairs(self, n: int | None = None) -> dict[str, tuple[Tensor, Tensor]]:
        """Concept name -> ``(before, after)``, each ``[n, C, H, W]`` (``n`` None: the
        datamodule's own count)."""


def _attached(trainer: object, task: object) -> object:
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None:
        raise CdistillError(
            f"{type(task).__name__} reads its data from the trainer's datamodule, and there is none: "
            "fit with trainer.fit(task, datamodule=...) (train.py does), not with bare dataloaders."
        )
    return datamodule


def attached_data(trainer: object, task: object) -> SplitData:
    """The datamodule ``trainer`` runs ``task`` on (Lightning's ``trainer.datamodule`` is untyped).

    Raises:
        CdistillError: The trainer runs on bare dataloaders, without a datamodule.
    """
    return cast(SplitData, _attached(trainer, task))


def attached_image_data(trainer: object, task: object) -> ImageData:
    """Like :func:`attached_data`, for a task that reads images (normalisation, channels, size).

    Raises:
        CdistillError: The trainer runs on bare dataloaders, without a datamodule.
    """
    return cast(ImageData, _attached(trainer, task))


def attached_concept_data(trainer: object, task: object) -> ConceptPairData:
    """Like :func:`attached_data`, for a task that needs :meth:`ConceptPairData.concept_pairs`.

    Raises:
        CdistillError: No datamodule, or one without ``concept_pairs`` (naming its class).
    """
    datamodule = _attached(trainer, task)
    if not callable(getattr(datamodule, "concept_pairs", None)):
        raise CdistillError(
            f"{type(task).__name__} needs a datamodule that renders concept pairs (concept_pairs(n)); "
            f"{type(datamodule).__name__} does not. Use data=iid_synthetic."
        )
    return cast(ConceptPairData, datamodule)
