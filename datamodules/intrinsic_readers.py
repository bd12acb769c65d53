"""Readers for real intrinsic-image data: the MIT Intrinsic Images layout and IIW judgements.

MIT Intrinsic Images (Grosse et al. 2009): one folder per object under the root, each with
``original.png`` (RGB), ``reflectance.png`` (RGB), ``shading.png`` (grey) and ``mask.png``
(grey). 8-bit and 16-bit PNGs are read; values are scaled to ``[0, 1]``.

Intrinsic Images in the Wild (Bell et al. 2014): ``<id>.png`` with ``<id>.json`` holding
``intrinsic_points`` (``id``, ``x``, ``y`` in ``[0, 1]``, ``opaque``) and
``intrinsic_comparisons`` (``point1``, ``point2``, ``darker`` in ``{"1", "2", "E"}``,
``darker_score`` the annotators' confidence).

Bad input raises :class:`~cdistill.errors.CdistillError` naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from cdistill.errors import CdistillError

MIT_FILES = {"original": "RGB", "reflectance": "RGB", "shading": "L", "mask": "L"}
_GREY_MODES = {"L": 255.0, "I;16": 65535.0, "I;16B": 65535.0, "I": 65535.0}


def read_png(path: Path, kind: str) -> Tensor:
    """Read an image as float ``[C, H, W]`` in ``[0, 1]``; ``kind`` is ``RGB`` or ``L``.

    Raises:
        CdistillError: Missing or unreadable file, or a mode that is not ``kind`` (an RGB
            file where a grey one belongs, a palette or alpha image ...).
    """
    if not path.is_file():
        raise CdistillError(f"Missing image file {str(path)!r}.")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except OSError as err:
        raise CdistillError(f"Cannot read image {str(path)!r}: {err}") from None
    if kind == "RGB" and mode == "RGB":
        scale = 65535.0 if arr.dtype == np.uint16 else 255.0
        return torch.from_numpy(arr.astype(np.float32) / scale).permute(2, 0, 1)
    if kind == "L" and mode in _GREY_MODES:
        return torch.from_numpy(arr.astype(np.float32) / _GREY_MODES[mode])[None]
    want = "an RGB image" if kind == "RGB" else "a grey image (mode L or 16-bit)"
    raise CdistillError(f"Image {str(path)!r} has mode {mode!r}; expected {want}.")


def _resize(x: Tensor, size: int | None) -> Tensor:
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]


def mit_objects(root: str | Path) -> list[Path]:
    """Object folders under an MIT Intrinsic Images root, sorted by name.

    Raises:
        CdistillError: The root is missing or holds no object folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise CdistillError(f"MIT Intrinsic Images root {str(root)!r} is not a folder (set data.root).")
    objects = sorted(p for p in root.iterdir() if p.is_dir())
    if not objects:
        raise CdistillError(
            f"MIT Intrinsic Images root {str(root)!r} has no object folders "
            f"(each needs {', '.join(f + '.png' for f in MIT_FILES)})."
        )
    return objects


def read_mit_object(folder: Path, size: int | None = None) -> dict[str, Tensor]:
    """One MIT object: ``image [3, H, W]``, ``reflectance [3, H, W]``, ``shading [1, H, W]``,
    ``mask [1, H, W]`` (binary), resized to ``size x size`` when given.

    Raises:
        CdistillError: A missing file, a file of the wrong mode, or files of different sizes
            (the message names the file).
    """
    parts = {name: read_png(folder / f"{name}.png", mode) for name, mode in MIT_FILES.items()}
    ref = parts["original"].shape[-2:]
    for name, x in parts.items():
        if x.shape[-2:] != ref:
            raise CdistillError(
                f"Image {str(folder / (name + '.png'))!r} is {tuple(x.shape[-2:])} (H, W) but "
                f"original.png is {tuple(ref)}: the four images of an object must match."
            )
    out = {k: _resize(v, size) for k, v in parts.items()}
    out["mask"] = (out["mask"] > 0.5).float()
    out["image"] = out.pop("original")
    return out


class MITIntrinsic(Dataset[dict[str, Tensor]]):
    """The MIT Intrinsic Images layout under ``root`` (see module docstring), read eagerly.

    Items: ``image``, ``reflectance``, ``shading``, ``mask`` (see :func:`read_mit_object`)
    and ``index``. Without ``size`` every object must have the same size (to batch them).

    Args:
        root: Folder of object folders.
        size: Resize every image to ``size x size`` (None: keep).
        objects: Only these object folder names (None: all).
    """

    def __init__(self, root: str | Path, size: int | None = None, objects: Sequence[str] | None = None) -> None:
        folders = mit_objects(root)
        if objects is not None:
            names = {p.name for p in folders}
            missing = [o for o in objects if o not in names]
            if missing:
                raise CdistillError(f"MIT objects {missing} are not folders of {str(root)!r}; it has {sorted(names)}.")
            folders = [p for p in folders if p.name in set(objects)]
        self.names = [p.name for p in folders]
        self.items = [read_mit_object(p, size) for p in folders]
        first = self.items[0]["image"].shape
        for folder, item in zip(folders, self.items, strict=True):
            if item["image"].shape != first:
                raise CdistillError(
                    f"Image {str(folder / 'original.png')!r} is {tuple(item['image'].shape[-2:])} but "
                    f"{str(folders[0] / 'original.png')!r} is {tuple(first[-2:])}: objects of different "
                    "sizes cannot be batched; set data.image_size to resize them."
                )

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {**self.items[i], "index": torch.tensor(i)}


@dataclass
class IIWImage:
    """One IIW photo and its judgements.

    Attributes:
        image: ``[3, H, W]`` in ``[0, 1]``.
        points: ``{point id: (x, y, opaque)}``, coordinates in ``[0, 1]``.
        comparisons: ``(point1, point2, darker, darker_score)`` per judgement.
    """

    image: Tensor
    points: dict[int, tuple[float, float, bool]]
    comparisons: list[tuple[int, int, str, float]]


def read_iiw_judgements(path: Path) -> tuple[dict[int, tuple[float, float, bool]], list[tuple[int, int, str, float]]]:
    """Parse an IIW ``<id>.json``: points and comparisons (see :class:`IIWImage`).

    Raises:
        CdistillError: Missing file, invalid JSON, no ``intrinsic_points`` or no
            ``intrinsic_comparisons`` (an image without judgements cannot be scored), a
            ``darker`` outside ``{1, 2, E}``, or a comparison naming an unknown point.
    """
    if not path.is_file():
        raise CdistillError(f"Missing IIW judgement file {str(path)!r}.")
    try:
        data: Any = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CdistillError(f"Cannot parse IIW judgement file {str(path)!r}: {err}") from None
    raw_points = data.get("intrinsic_points") if isinstance(data, dict) else None
    raw_comps = data.get("intrinsic_comparisons") if isinstance(data, dict) else None
    if not raw_points or not raw_comps:
        raise CdistillError(
            f"IIW judgement file {str(path)!r} has no judgements: it needs non-empty "
            "'intrinsic_points' and 'intrinsic_comparisons'."
        )
    try:
        points = {int(p["id"]): (float(p["x"]), float(p["y"]), bool(p.get("opaque", True))) for p in raw_points}
        comps = []
        for c in raw_comps:
            darker = str(c["darker"])
            if darker not in ("1", "2", "E"):
                raise CdistillError(f"IIW judgement file {str(path)!r}: darker={c['darker']!r} is not 1, 2 or E.")
            p1, p2 = int(c["point1"]), int(c["point2"])
            if p1 not in points or p2 not in points:
                raise CdistillError(f"IIW judgement file {str(path)!r}: comparison names unknown point {p1} or {p2}.")
            score = c.get("darker_score")
            comps.append((p1, p2, darker, float(score) if score is not None else 0.0))
    except (KeyError, TypeError, ValueError) as err:
        raise CdistillError(f"IIW judgement file {str(path)!r} is malformed: {err!r}") from None
    return points, comps


class IIWJudgements(Dataset[IIWImage]):
    """IIW photos ``<id>.png`` with judgements ``<id>.json`` in one folder.

    Args:
        root: The folder.
        size: Resize images to ``size x size`` (judgements use relative coordinates).

    Raises:
        CdistillError: A missing folder, no ``.png`` files, a photo without its ``.json``
            (or the reverse), bad JSON (see :func:`read_iiw_judgements`).
    """

    def __init__(self, root: str | Path, size: int | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise CdistillError(f"IIW root {str(root)!r} is not a folder (set data.root).")
        pngs = sorted(root.glob("*.png"))
        if not pngs:
            raise CdistillError(f"IIW root {str(root)!r} has no <id>.png images.")
        for js in sorted(root.glob("*.json")):
            if not js.with_suffix(".png").is_file():
                raise CdistillError(f"IIW judgement file {str(js)!r} has no image {js.with_suffix('.png').name!r}.")
        self.ids = [p.stem for p in pngs]
        self.items = []
        for png in pngs:
            points, comps = read_iiw_judgements(png.with_suffix(".json"))
            self.items.append(IIWImage(_resize(read_png(png, "RGB"), size), points, comps))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> IIWImage:
        return self.items[i]
