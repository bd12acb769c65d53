"""Where the shipped configs (``conf/``) and concept specs (``concepts/``) live.

In a checkout (and an editable install) they are the repository's own top-level folders, next
to the ``cdistill`` package. A built wheel ships copies of them as package data under
``cdistill/_data/`` (``setup.py`` copies them at build time), because a wheel installs only
packages, not the repository's other folders. Every lookup goes through :func:`data_root`, so
``cdistill-train``, ``cdistill-pipeline``, ``python train.py`` and the relative spec paths in
the configs (``concepts/color_mnist.yaml``) find the same files from any working directory.
"""

from __future__ import annotations

from pathlib import Path

from cdistill.errors import CdistillError

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the cdistill package (this file is in utils/)
#: Installed from a wheel: the copies shipped inside the package.
SHIPPED_ROOT = PACKAGE_DIR / "_data"
#: A checkout: the repository root, which holds ``cdistill/``, ``conf/`` and ``concepts/``.
CHECKOUT_ROOT = PACKAGE_DIR.parent
#: The file whose presence marks a root as complete (Hydra's primary config).
_MARKER = Path("conf") / "train.yaml"


def _candidates() -> tuple[Path, ...]:
    # The shipped copy first: an installed package's parent is site-packages, where another
    # distribution may have put an unrelated top-level ``conf/``; a checkout has no ``_data/``.
    return (SHIPPED_ROOT, CHECKOUT_ROOT)


def data_root() -> Path:
    """The folder that holds ``conf/`` and ``concepts/``.

    Returns:
        ``cdistill/_data`` when installed from a wheel, else the repository root.

    Raises:
        CdistillError: Neither place has ``conf/train.yaml`` (a broken install).
    """
    for root in _candidates():
        if (root / _MARKER).is_file():
            return root
    tried = ", ".join(str(root / _MARKER) for root in _candidates())
    raise CdistillError(
        f"cdistill's configs were not found (looked for {tried}). Reinstall cdistill from a wheel "
        "built by `pip wheel .` (it ships conf/ and concepts/), or run from a checkout."
    )


def conf_dir() -> str:
    """Hydra's primary config directory (absolute), for ``@hydra.main(config_path=...)``."""
    return str(data_root() / "conf")


def concepts_dir() -> Path:
    """The folder of the shipped concept specs (``color_mnist.yaml``, ...)."""
    return data_root() / "concepts"


def resolve_data_path(path: str | Path) -> Path:
    """Resolve a file path the way config values are meant.

    A relative path that exists from the working directory is the user's own file; otherwise it
    names a shipped file relative to :func:`data_root` (``concepts/color_mnist.yaml``), which
    works from any working directory, in a checkout and when installed.

    Args:
        path: Absolute, or relative to the working directory or to the data root.

    Returns:
        The path to use; it may not exist (the caller reports that by name).
    """
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    shipped = data_root() / candidate
    return shipped if shipped.exists() else candidate
