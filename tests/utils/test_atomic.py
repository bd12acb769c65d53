"""Generated data is built atomically and checked on load (faces proxy, offline teacher,
feature cache), and the feature cache is capped (size report, LRU eviction)."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import cdistill.teacher.stage as stage_mod
from cdistill.errors import CdistillError
from cdistill.teacher.feature_cache import cache_report, cached_tensors, evict, feature_files, main
from cdistill.teacher.offline import ensure_digits_ae
from cdistill.teacher.teachers import create_teacher
from cdistill.utils import MANIFEST, build_file, build_folder, check_folder
from datamodules.faces_proxy import MARKER, ProxySettings, ensure_faces_proxy

#: A proxy that draws in about a second (40 training faces, plus the template's concept sets).
TINY = ProxySettings(n_train=40, n_valid=8, n_test=8, size=32)


def _tree_digest(root: Path) -> str:
    """SHA-256 over every file's relative path and bytes (the manifest excluded)."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _build_proxy(root: str, barrier: Any, results: Any) -> None:
    """Worker of the concurrency test: start together, build, report what this process sees."""
    barrier.wait()
    out = ensure_faces_proxy(root, TINY)
    results.put(_tree_digest(out))


# --------------------------------------------------------------------------- faces proxy


def test_two_processes_build_the_same_proxy(tmp_path: Path) -> None:
    reference = _tree_digest(ensure_faces_proxy(tmp_path / "reference", TINY))
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_proxy, args=(str(tmp_path / "shared"), barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    seen = [results.get(timeout=5) for _ in procs]
    assert seen == [reference, reference]  # both complete and identical to a serial build
    assert _tree_digest(tmp_path / "shared") == reference
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or p.name.endswith(".partial")]


def test_partly_deleted_proxy_is_detected_and_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = ensure_faces_proxy(tmp_path / "p", TINY)
    complete = _tree_digest(root)
    pngs = sorted(root.rglob("*.png"))
    for f in pngs[::7]:  # a share of the files of every split, as an interrupted copy leaves them
        f.unlink()
    assert (root / MARKER).is_file()  # the marker alone does not make it complete
    with caplog.at_level(logging.WARNING):
        ensure_faces_proxy(root, TINY)
    assert _tree_digest(root) == complete
    assert str(root) in caplog.text and "missing" in caplog.text
    # A truncated image (same count, other size) is caught too.
    victim = sorted(root.rglob("*.png"))[3]
    victim.write_bytes(victim.read_bytes()[:20])
    ensure_faces_proxy(root, TINY)
    assert _tree_digest(root) == complete


def test_proxy_without_manifest_or_with_leftovers_is_rebuilt(tmp_path: Path) -> None:
    root = ensure_faces_proxy(tmp_path / "p", TINY)
    complete = _tree_digest(root)
    (root / MANIFEST).unlink()  # a folder written by an older version, or killed before its manifest
    leftover = tmp_path / ".p.tmp-dead"  # a build whose process was killed
    (leftover / "valid").mkdir(parents=True)
    ensure_faces_proxy(root, TINY)
    assert (root / MANIFEST).is_file() and _tree_digest(root) == complete and not leftover.exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("user data")
    with pytest.raises(CdistillError, match="not a faces proxy"):
        ensure_faces_proxy(tmp_path / "mine", TINY)


def test_build_folder_checks_meta_and_cleans_up_a_failed_build(tmp_path: Path) -> None:
    calls: list[int] = []

    def build(folder: Path) -> None:
        calls.append(1)
        (folder / "a.txt").write_text("a" * len(calls))

    target = build_folder(tmp_path / "out", build, {"v": 1})
    assert check_folder(target, {"v": 1}) is None and check_folder(target, {"v": 2}) == "built for other settings"
    build_folder(target, build, {"v": 1})
    assert len(calls) == 1
    build_folder(target, build, {"v": 2})
    assert len(calls) == 2 and (target / "a.txt").read_text() == "aa"

    def broken(folder: Path) -> None:
        (folder / "half.txt").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_folder(tmp_path / "other", broken, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.lock", ".out.lock", "out"]


# --------------------------------------------------------------------------- single files


def test_truncated_cache_file_is_named_and_recomputed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        return {"a": torch.arange(3000.0).reshape(30, 100)}

    first = cached_tensors(tmp_path, "teacher", "k" * 64, compute)
    (path,) = feature_files(tmp_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        again = cached_tensors(tmp_path, "teacher", "k" * 64, compute)
    assert len(calls) == 2 and torch.equal(first["a"], again["a"])
    assert str(path) in caplog.text and "unreadable" in caplog.text
    assert torch.equal(torch.load(path, weights_only=True)["a"], first["a"])  # repaired on disk
    cached_tensors(tmp_path, "teacher", "k" * 64, compute)
    assert len(calls) == 2


def test_truncated_offline_teacher_is_retrained(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = {"images": 32, "epochs": 1, "width": 4}
    path = ensure_digits_ae(tmp_path, settings)
    good = torch.load(path, weights_only=True)
    path.write_bytes(path.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        assert ensure_digits_ae(tmp_path, settings) == path
    assert str(path) in caplog.text
    state = torch.load(path, weights_only=True)
    assert all(torch.equal(state[k], good[k]) for k in good)  # trained again, deterministically
    create_teacher("cdistill:digits_ae", "encoder.conv1", checkpoint_path=str(path), model_kwargs={"width": 4})


def test_build_file_passes_user_errors_through(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    target.write_text("x")

    def load(path: Path) -> str:
        raise CdistillError("bad setting")

    with pytest.raises(CdistillError, match="bad setting"):
        build_file(target, lambda tmp: "", load)


# --------------------------------------------------------------------------- size and eviction


def _fill(folder: Path, n: int, numel: int = 10_000) -> list[Path]:
    """``n`` cache files of the same size, accessed in order (oldest first)."""
    paths = []
    for i in range(n):
        key = f"{i:<064d}"
        cached_tensors(folder, "student", key, lambda: {"x": torch.zeros(numel)})
        paths.append(folder / f"student-{key[:20]}.pt")
        os.utime(paths[-1], ns=(1_000_000_000 * (i + 1), paths[-1].stat().st_mtime_ns))  # accessed long ago, in order
    return paths


def test_eviction_removes_least_recently_used(tmp_path: Path) -> None:
    paths = _fill(tmp_path, 4)
    size = paths[0].stat().st_size
    (tmp_path / "teachers").mkdir()
    (tmp_path / "teachers" / "digits_ae-x.pt").write_bytes(b"0" * 3 * size)
    assert cache_report(tmp_path).files == 4 and cache_report(tmp_path).bytes == 4 * size
    # A hit makes the oldest file the most recent one.
    cached_tensors(tmp_path, "student", f"{0:<064d}", lambda: pytest.fail("cached"))
    removed = evict(tmp_path, 2 * size)
    assert removed == [paths[1], paths[2]]
    assert sorted(feature_files(tmp_path)) == sorted([paths[0], paths[3]])
    # The cap applies after use, and never to the file just used nor to trained teachers.
    cached_tensors(tmp_path, "teacher", "t" * 64, lambda: {"x": torch.zeros(10)}, max_bytes=0)
    assert [p.name for p in feature_files(tmp_path)] == [f"teacher-{'t' * 20}.pt"]
    assert (tmp_path / "teachers" / "digits_ae-x.pt").is_file()
    assert not list(tmp_path.glob(".student-*.lock"))  # the evicted files' locks went with them
    with pytest.raises(CdistillError, match="max_bytes=-1"):
        evict(tmp_path, -1)


def test_size_report_and_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = _fill(tmp_path, 3)
    size = paths[0].stat().st_size
    report = cache_report(tmp_path)
    assert (report.files, report.bytes) == (3, 3 * size) and str(tmp_path) in str(report)
    assert main([str(tmp_path), "--report"]) == 0
    assert "3 feature files" in capsys.readouterr().out
    assert main([str(tmp_path), "--evict", "--max-bytes", str(size)]) == 0
    assert "evicted 2 files" in capsys.readouterr().out and feature_files(tmp_path) == [paths[2]]
    assert cache_report(tmp_path / "missing").files == 0
    with pytest.raises(CdistillError, match="--max-bytes"):
        main([str(tmp_path), "--evict", "--max-bytes", "lots"])


def test_teacher_stage_caps_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = create_teacher("cdistill:digits_ae", "encoder.conv2", model_kwargs={"width": 4})
    monkeypatch.setattr(stage_mod, "teacher_from_config", lambda cfg: teacher)
    old = _fill(tmp_path, 2)
    images = {k: torch.randint(0, 256, (8, 3, 28, 28), dtype=torch.uint8) for k in "ab"}
    student = {k: torch.randn(8, 5, 8, 8) for k in images}
    cfg = {"name": "x", "layer": "encoder.conv2", "pca_dims": 0, "mapping": {"epochs": 1},
           "cache_dir": str(tmp_path), "cache_max_bytes": 0}
    stage_mod.map_concept_sets(cfg, images, student)
    assert not any(p.exists() for p in old) and len(feature_files(tmp_path)) == 1
    with pytest.raises(CdistillError, match="cache_max_bytes"):
        stage_mod.check_teacher_config({**cfg, "cache_max_bytes": -5})
