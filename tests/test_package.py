"""Installed, not only checked out: a wheel ships ``conf/`` and ``concepts/`` and its console
scripts compose configs from any working directory (issue 11, section 8)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: What a wheel is built from (a checkout's files; missing ones are skipped).
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "cdistill", "datamodules", "conf", "concepts")
#: pip without the network: no index, no dependencies, the venv's setuptools as build backend.
PIP_OFFLINE = ("--no-deps", "--no-index", "--disable-pip-version-check", "-q")


def builds(test: Callable[..., None]) -> Callable[..., None]:
    """Mark a test that builds the package (15-45 s together on 2 busy cores); it guards the
    promise that an installed cdistill runs, so it stays in the default tier and CI (``core``)."""
    return pytest.mark.core(pytest.mark.slow(test))


def _copy_sources(dest: Path) -> Path:
    # Build from a copy so the checkout gets no build/ or egg-info and parallel runs don't clash.
    dest.mkdir()
    for name in BUILD_INPUTS:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif source.is_file():
            shutil.copy2(source, dest / name)
    return dest


def _pip(*args: str, cwd: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Build the wheel and install it into a bare target folder.

    Returns:
        ``(wheel file, target folder)``; the target holds the packages and ``bin/`` scripts.
    """
    tmp = tmp_path_factory.mktemp("package")
    source = _copy_sources(tmp / "src")
    _pip("wheel", "--no-build-isolation", *PIP_OFFLINE, "-w", str(tmp / "dist"), str(source), cwd=tmp)
    (wheel,) = (tmp / "dist").glob("cdistill-*.whl")
    _pip("install", *PIP_OFFLINE, "--target", str(tmp / "site"), str(wheel), cwd=tmp)
    return wheel, tmp / "site"


def _elsewhere_env(site: Path) -> dict[str, str]:
    # Only the installed copy is importable; the checkout is neither cwd nor on the path.
    return {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}


def _repo_files(folder: str) -> set[str]:
    root = REPO / folder
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


@builds
def test_wheel_ships_configs_specs_and_datamodules(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for folder in ("conf", "concepts"):
        prefix = f"cdistill/_data/{folder}/"
        shipped = {n.removeprefix(prefix) for n in names if n.startswith(prefix)}
        assert shipped == _repo_files(folder), folder
    assert "datamodules/__init__.py" in names
    assert "cdistill/utils/resources.py" in names


@builds
def test_sdist_carries_configs_and_specs(tmp_path: Path) -> None:
    # `python -m build` makes the wheel from the sdist, so the sdist must hold what setup.py copies.
    source = _copy_sources(tmp_path / "src")
    build = "from setuptools import build_meta as b; print(b.build_sdist(r'%s'))" % (tmp_path / "sdist")
    proc = subprocess.run([sys.executable, "-c", build], cwd=source, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (archive,) = (tmp_path / "sdist").glob("cdistill-*.tar.gz")
    with tarfile.open(archive) as tar:
        inside = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}  # under cdistill-<version>/
    for folder in ("conf", "concepts"):
        shipped = {n.removeprefix(f"{folder}/") for n in inside if n.startswith(f"{folder}/")}
        assert _repo_files(folder) <= shipped, folder


@builds
@pytest.mark.parametrize("script", ["cdistill-train", "cdistill-pipeline"])
def test_console_script_composes_from_another_directory(installed: tuple[Path, Path], tmp_path: Path,
                                                        script: str) -> None:
    _, site = installed
    cmd = [str(site / "bin" / script), "experiment=color_mnist/cd", "--cfg", "job", "--resolve"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_elsewhere_env(site), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "task_name: color_mnist_cd" in proc.stdout  # the experiment config was found and applied
    assert "spec: concepts/color_mnist.yaml" in proc.stdout
    assert f"root_dir: {tmp_path}" in proc.stdout  # runs write under the working directory


@builds
def test_installed_package_reads_its_own_data(installed: tuple[Path, Path], tmp_path: Path) -> None:
    _, site = installed
    probe = (
        "import cdistill.utils.resources as r, cdistill.concepts as c, datamodules.faces_proxy as f\n"
        "print(r.conf_dir()); print(f.TEMPLATE_SPEC if f.TEMPLATE_SPEC.is_file() else 'missing')\n"
        "print(' '.join(sorted(c.load_spec('concepts/color_mnist.yaml'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=_elsewhere_env(site),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    conf, template, sets = proc.stdout.splitlines()
    assert Path(conf) == (site / "cdistill" / "_data" / "conf").resolve()
    assert Path(template) == (site / "cdistill" / "_data" / "concepts" / "faces_proxy.yaml").resolve()
    assert {"color_0", "color_9", "grey", "random/0"} <= set(sets.split())


def test_relative_spec_prefers_the_users_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cdistill.utils.resources import data_root, resolve_data_path

    monkeypatch.chdir(tmp_path)
    assert resolve_data_path("concepts/color_mnist.yaml") == data_root() / "concepts" / "color_mnist.yaml"
    own = tmp_path / "concepts" / "color_mnist.yaml"
    own.parent.mkdir()
    own.write_text("sets: {}\n")
    assert resolve_data_path("concepts/color_mnist.yaml").resolve() == own  # the user's copy wins
    assert resolve_data_path("concepts/nope.yaml") == Path("concepts/nope.yaml")  # reported as given


def test_data_root_prefers_shipped_copy_and_names_a_broken_install(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import cdistill.utils.resources as resources
    from cdistill.errors import CdistillError

    shipped, checkout = tmp_path / "shipped", tmp_path / "checkout"
    monkeypatch.setattr(resources, "SHIPPED_ROOT", shipped)
    monkeypatch.setattr(resources, "CHECKOUT_ROOT", checkout)
    with pytest.raises(CdistillError, match=r"train\.yaml"):
        resources.data_root()
    for root in (checkout, shipped):
        (root / "conf").mkdir(parents=True)
        (root / "conf" / "train.yaml").write_text("{}\n")
        assert resources.data_root() == root  # the shipped copy wins once it exists
