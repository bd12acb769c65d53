"""Faces proxy: drawn faces written to disk in the BFFHQ layout, so the BFFHQ reader reads them.

This is a **proxy** for BFFHQ (real faces cannot be downloaded here), not BFFHQ itself. Each
image is a cartoon face (oval, eyes, nose, mouth, a fringe of hair) on a random background
with random skin and hair colours, plus two separate cues:

* **age** (the target, 0 young / 1 old): thin wrinkle lines on the forehead, at the eye corners
  and from nose to mouth (old only). Thin, low-contrast lines: the *hard* cue.
* **gender** (the bias, 0 female / 1 male): long hair falling to the shoulders (female) or a
  short cap (male). A large area of colour: the *easy* cue, so a baseline learns it first,
  as on real BFFHQ.

Training is bias-aligned (``age == gender``: young women, old men) except a ``conflict_ratio``
share (0.5% by default), ``valid`` and ``test`` are unbiased (50% conflicting). Concept folders
for CAVs and TCAV are written next to the data (``concepts/``), from the sets that the template
spec ``concepts/faces_proxy.yaml`` names, and the spec is copied into the root as
``concepts.yaml`` so its ``folder:`` entries resolve there.

Everything is a pure function of the :class:`ProxySettings` (seeded ``numpy`` generators per
image); a marker file holds their hash, and a manifest (file count, names and sizes) is checked
on every load: the data are (re)written, atomically and under a lock, only when the proxy is
missing, partial or was drawn with other settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, ImageDraw

from cdistill.concepts import PROJECT_ROOT, expand_templates
from cdistill.errors import CdistillError
from cdistill.utils import MANIFEST, build_folder
from datamodules.bffhq import BFFHQDataModule

MARKER = ".faces_proxy.json"
#: Bump when the drawing changes, so cached proxies are redrawn.
VERSION = "2"
TEMPLATE_SPEC = PROJECT_ROOT / "concepts" / "faces_proxy.yaml"
#: Hair and skin colours (RGB), chosen independently of age and gender.
HAIR = np.array([[30, 25, 20], [90, 60, 30], [150, 110, 60], [200, 170, 100], [130, 50, 20], [60, 60, 60]])
SKIN = np.array([[250, 215, 190], [225, 180, 150], [190, 140, 100], [140, 95, 65], [100, 70, 50]])


@dataclass(frozen=True)
class ProxySettings:
    """What the proxy is a function of (hashed into the marker).

    Attributes:
        n_train: Training images (align + conflict), balanced over age.
        n_valid: Validation images, 50% conflicting.
        n_test: Test images, 50% conflicting.
        conflict_ratio: Share of bias-conflicting training images (BFFHQ: 0.005).
        size: Side of the written PNGs (the reader resizes to ``data.image_size``).
        wrinkle_contrast: Darkening of the wrinkle lines relative to the skin, in ``(0, 1]``.
        seed: Seeds every image.
    """

    n_train: int = 3000
    n_valid: int = 400
    n_test: int = 600
    conflict_ratio: float = 0.005
    size: int = 64
    wrinkle_contrast: float = 0.9
    seed: int = 0

    @property
    def pct(self) -> str:
        """BFFHQ's folder name for the ratio: ``0.5pct`` for 0.005."""
        return f"{100 * self.conflict_ratio:g}pct"

    def digest(self) -> str:
        """Hash of the settings and the template spec (any change regenerates)."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True) + TEMPLATE_SPEC.read_text() + VERSION
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def draw_face(rng: np.random.Generator, age: int, gender: int, size: int, contrast: float) -> np.ndarray:
    """Draw one face.

    Drawn on a 128-unit canvas at twice ``size`` and downsampled (box filter), which
    anti-aliases the thin wrinkle lines instead of dropping them.

    Args:
        rng: The image's own generator (every random choice comes from it).
        age: 0 young (no wrinkles) or 1 old (wrinkles).
        gender: 0 female (long hair) or 1 male (short hair).
        size: Output side in pixels.
        contrast: Wrinkle darkening in ``(0, 1]``.

    Returns:
        ``uint8 [size, size, 3]``.
    """
    s = 2 * size
    u = s / 128.0  # canvas unit -> pixels

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (x0 * u, y0 * u, x1 * u, y1 * u)

    jitter = rng.integers(-20, 21, size=3)
    bg = tuple(int(v) for v in rng.integers(30, 226, size=3))
    hair = tuple(int(v) for v in np.clip(HAIR[rng.integers(len(HAIR))] + jitter, 0, 255))
    skin_rgb = np.clip(SKIN[rng.integers(len(SKIN))] + rng.integers(-12, 13, size=3), 0, 255)
    skin = tuple(int(v) for v in skin_rgb)
    line = tuple(int(v) for v in skin_rgb * (1.0 - contrast))
    cx, cy = 64 + rng.uniform(-6, 6), 66 + rng.uniform(-5, 5)
    fw, fh = rng.uniform(25, 31), rng.uniform(33, 39)  # half width / height of the face

    img = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(img)
    if gender == 0:  # long hair behind the face, down to the bottom edge
        d.ellipse(box(cx - fw - 9, cy - fh - 8, cx + fw + 9, cy + fh * 0.5), fill=hair)
        d.rectangle(box(cx - fw - 9, cy - 4, cx + fw + 9, 128), fill=hair)
    d.ellipse(box(cx - fw, cy - fh, cx + fw, cy + fh), fill=skin)
    # The same fringe for both genders: only the length of the hair tells them apart.
    d.chord(box(cx - fw - 3, cy - fh - 7, cx + fw + 3, cy - fh + 27), 180, 360, fill=hair)
    ey = cy - 4 + rng.uniform(-2, 2)
    for sx in (-1, 1):
        d.ellipse(box(cx + sx * 11 - 3.5, ey - 3, cx + sx * 11 + 3.5, ey + 3), fill=(25, 20, 20))
    d.line(box(cx, ey + 4, cx - 2, cy + 10), fill=line, width=max(1, round(u)))
    mw = rng.uniform(7, 10)
    d.arc(box(cx - mw, cy + 12, cx + mw, cy + 22), 20, 160, fill=(150, 40, 40), width=max(1, round(2 * u)))
    jit = rng.uniform(-0.7, 0.7, size=3)  # drawn for both ages: the noise below stays the same
    if age == 1:
        w = max(1, round(u))
        for k in range(3):  # forehead
            y = cy - fh + 14 + 4 * k + jit[k]
            d.arc(box(cx - 13, y, cx + 13, y + 6), 200, 340, fill=line, width=w)
        for sx in (-1, 1):  # crow's feet and nose-to-mouth lines
            x = cx + sx * 16
            d.line(box(x, ey - 2, x + sx * 5, ey - 4), fill=line, width=w)
            d.line(box(x, ey + 1, x + sx * 5, ey + 3), fill=line, width=w)
            d.line(box(cx + sx * 5, cy + 4, cx + sx * (mw + 2), cy + 17), fill=line, width=w)
    arr = np.asarray(img.resize((size, size), Image.Resampling.BOX), dtype=np.float64)
    noisy = arr + rng.normal(0.0, 6.0, size=arr.shape)  # sensor noise, independent of the cues
    return np.clip(noisy.round(), 0, 255).astype(np.uint8)


def _write(folder: Path, names_attrs: list[tuple[str, int, int]], settings: ProxySettings, tag: str) -> None:
    """Draw and save ``[(file name, age, gender)]`` into ``folder``; image ``i`` of ``tag`` is
    seeded by ``(seed, tag, i)`` so sets never share a face."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, age, gender) in enumerate(names_attrs):
        rng = np.random.default_rng([settings.seed, zlib.crc32(tag.encode()), i])
        arr = draw_face(rng, age, gender, settings.size, settings.wrinkle_contrast)
        Image.fromarray(arr).save(folder / name, optimize=False, compress_level=1)


def _split_attrs(n: int, conflict_ratio: float, seed: int, tag: str) -> list[tuple[int, int]]:
    """``n`` (age, gender) pairs, age balanced, ``round(n * conflict_ratio)`` conflicting
    (``gender != age``), the conflicting ones spread evenly over both ages."""
    n_conf = round(n * conflict_ratio)
    ages = [i % 2 for i in range(n)]
    rng = np.random.default_rng([seed, zlib.crc32(tag.encode()), n])
    conflicting: set[int] = set()
    for age in (0, 1):  # half of the conflicting images per age (age 0 gets the odd one)
        pool = np.array([i for i in range(n) if ages[i] == age])
        conflicting |= set(rng.permutation(pool)[: (n_conf + 1 - age) // 2].tolist())
    return [(a, 1 - a if i in conflicting else a) for i, a in enumerate(ages)]


def concept_sets(spec_path: Path = TEMPLATE_SPEC) -> dict[str, dict[str, object]]:
    """The template spec's sets (``for_k`` expanded): name -> entry with ``folder``, ``n`` and
    optional fixed ``age``/``gender`` (a missing one is drawn at random per image)."""
    spec = yaml.safe_load(spec_path.read_text()) or {}
    sets = expand_templates(spec.get("sets") or {})
    for name, entry in sets.items():
        if "folder" not in entry or "n" not in entry:
            raise CdistillError(f"Proxy concept set {name!r} in {str(spec_path)!r} needs 'folder' and 'n'.")
    return sets


def generate(root: Path, settings: ProxySettings) -> None:
    """Write the whole proxy into ``root`` (an empty folder)."""
    train = _split_attrs(settings.n_train, settings.conflict_ratio, settings.seed, "train")
    for kind, want_conflict in (("align", False), ("conflict", True)):
        for label in (0, 1):
            rows = [(f"{i}_{a}_{g}.png", a, g) for i, (a, g) in enumerate(train)
                    if a == label and (a != g) == want_conflict]
            (root / settings.pct / kind / str(label)).mkdir(parents=True, exist_ok=True)
            _write(root / settings.pct / kind / str(label), rows, settings, f"train{kind}{label}")
    for split, n in (("valid", settings.n_valid), ("test", settings.n_test)):
        attrs = _split_attrs(n, 0.5, settings.seed, split)
        _write(root / split, [(f"{i}_{a}_{g}.png", a, g) for i, (a, g) in enumerate(attrs)], settings, split)
    for name, entry in concept_sets().items():
        n = int(str(entry["n"]))
        rng = np.random.default_rng([settings.seed, zlib.crc32(name.encode())])
        rows = []
        for i in range(n):
            age = int(str(entry["age"])) if "age" in entry else int(rng.integers(2))
            gender = int(str(entry["gender"])) if "gender" in entry else int(rng.integers(2))
            rows.append((f"{i:04d}_{age}_{gender}.png", age, gender))
        _write(root / str(entry["folder"]), rows, settings, f"concept:{name}")
    shutil.copyfile(TEMPLATE_SPEC, root / "concepts.yaml")


def _is_ours(root: Path) -> bool:
    """Whether ``root`` was written by the proxy generator (it holds the marker or a manifest)."""
    return (root / MARKER).is_file() or (root / MANIFEST).is_file()


def ensure_faces_proxy(root: str | Path, settings: ProxySettings) -> Path:
    """Make sure ``root`` holds the complete proxy for ``settings``; write it only when needed.

    Checked on every call against its manifest (file count, names and sizes: see
    :func:`cdistill.utils.build_folder`). A missing, stale (other settings), partial or partly
    deleted proxy is rebuilt in a private temporary folder and renamed into place under a
    lock, so concurrent runs build it once and never read a half-written one.

    Raises:
        CdistillError: When ``root`` exists, is not empty and is not a proxy (it is not ours
            to overwrite).
    """
    root = Path(root).expanduser()
    if root.exists() and not _is_ours(root) and any(root.iterdir()):
        raise CdistillError(
            f"{str(root)!r} exists and is not a faces proxy (no {MARKER}); refusing to write "
            "into it. Point data.root at an empty or new folder."
        )
    digest = settings.digest()

    def build(folder: Path) -> None:
        generate(folder, settings)
        (folder / MARKER).write_text(json.dumps({"digest": digest, **dataclasses.asdict(settings)}, indent=2))

    return build_folder(root, build, {"faces_proxy": digest})


class FacesProxyDataModule(BFFHQDataModule):
    """The BFFHQ reader on the drawn proxy, written into ``root`` on first use.

    Args:
        root: Cache folder of the proxy (created; never a real dataset: a non-empty folder
            without the proxy marker is refused).
        n_train, n_valid, n_test, conflict_ratio, proxy_size, wrinkle_contrast, proxy_seed:
            The :class:`ProxySettings` (defaults there; ``proxy_size`` is its ``size``, and the
            data's own seed is ``proxy_seed``, fixed across training seeds as a real dataset is).
        unbiased: The oracle: 50% of the training faces bias-conflicting (gender independent
            of age) instead of ``conflict_ratio``. ``valid``/``test`` are the same faces as
            in the biased proxy. Written to ``<root>_unbiased`` so that the biased proxy's
            cache in ``root`` is not redrawn.
        **kwargs: :class:`BFFHQDataModule` arguments (``image_size``, ``seed``, batch sizes ...).
    """

    name: str = "faces_proxy"
    random_cue_split: str | None = "test"  # unbiased: gender drawn independently of age

    def __init__(
        self,
        root: str | None = None,
        n_train: int = ProxySettings.n_train,
        n_valid: int = ProxySettings.n_valid,
        n_test: int = ProxySettings.n_test,
        conflict_ratio: float = ProxySettings.conflict_ratio,
        proxy_size: int = ProxySettings.size,
        wrinkle_contrast: float = ProxySettings.wrinkle_contrast,
        proxy_seed: int = ProxySettings.seed,
        unbiased: bool = False,
        **kwargs: Any,
    ) -> None:
        for key, value in (("n_train", n_train), ("n_valid", n_valid), ("n_test", n_test)):
            if int(value) < 4:
                raise CdistillError(f"data.{key}={value} must be >= 4.")
        if not 0.0 < float(conflict_ratio) < 1.0:
            raise CdistillError(f"data.conflict_ratio={conflict_ratio} must be in (0, 1).")
        self.unbiased = bool(unbiased)
        if self.unbiased:  # the oracle: the gender cue carries no information about age
            conflict_ratio = 0.5
            root = f"{str(root).rstrip('/')}_unbiased" if root else root
        self.settings = ProxySettings(int(n_train), int(n_valid), int(n_test), float(conflict_ratio),
                                      int(proxy_size), float(wrinkle_contrast), int(proxy_seed))
        kwargs.pop("pct", None)  # the folder name follows conflict_ratio
        super().__init__(root=root, pct=self.settings.pct, **kwargs)

    def _ensure(self) -> None:
        if self.root is None:
            raise CdistillError("data.root is not set: give a cache folder for the faces proxy.")
        ensure_faces_proxy(self.root, self.settings)

    def prepare_data(self) -> None:
        """Write the proxy once (Lightning calls this on one process per node)."""
        self._ensure()

    def setup(self, stage: str | None = None) -> None:
        """Write the proxy if missing (direct use without a Trainer), then read it."""
        if not self._datasets:
            self._ensure()
        super().setup(stage)
