"""Build hook: ship the repository's ``conf/`` and ``concepts/`` inside the package.

All metadata is in ``pyproject.toml``. A wheel installs only packages, so the Hydra configs and
concept specs that live at the repository root are copied into ``cdistill/_data/`` of the build
(``cdistill.utils.resources`` looks there first). The checkout keeps its layout, and an editable
install reads the checkout's own folders, so nothing is copied for it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: Repository folders the console scripts read at run time.
DATA_DIRS = ("conf", "concepts")
PACKAGE_DATA_DIR = Path("cdistill") / "_data"


class BuildPyWithData(build_py):
    """``build_py`` that also copies :data:`DATA_DIRS` into ``cdistill/_data/``."""

    def run(self) -> None:
        """Build the packages, then add the data folders (not for editable installs)."""
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install uses the checkout's own conf/ and concepts/
        for name in DATA_DIRS:
            self._copy_data_dir(name)

    def _copy_data_dir(self, name: str) -> None:
        source = ROOT / name
        if not source.is_dir():
            # An sdist made without MANIFEST.in would build a wheel that cannot run.
            raise FileNotFoundError(f"{source} is missing; build from a checkout or a full sdist.")
        target = Path(self.build_lib) / PACKAGE_DATA_DIR / name
        shutil.rmtree(target, ignore_errors=True)  # no stale files from an earlier build
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"))


setup(cmdclass={"build_py": BuildPyWithData})
