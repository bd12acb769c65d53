"""Concept sets: a folder of images, or a YAML spec that generates images from a seed.

A spec (see ``concepts/*.yaml``) lists named sets; each is generated deterministically::

    image_size: 28
    channels: 3
    sets:
      color_{k}: {kind: strokes, fill: palette, index: "{k}", n: 100, for_k: 10}
      grey:      {kind: strokes, fill: grey, n: 100}
      random:    {kind: strokes, fill: random_rgb, n: 1000, split: 10}

``for_k: K`` expands one entry into K sets (``{k}`` is replaced by 0..K-1); ``split: S`` cuts
a pool into S disjoint sets ``random/0`` .. ``random/S-1`` (for TCAV significance tests).

Generated and loaded images are ``uint8 [N, C, H, W]``; :func:`preprocess` gives them the
student's preprocessing (size, channels, normalisation), so concept activations live where
training activations do.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from cdistill.concepts.glyphs import draw_glyphs
from cdistill.concepts.palette import PALETTE
from cdistill.concepts.textures import make_textures
from cdistill.errors import CdistillError
from cdistill.utils.resources import data_root, resolve_data_path

log = logging.getLogger(__name__)
#: Folders (and target size, channels) already warned about: once per set, not at every CAV refresh.
_WARNED: set[tuple[str, int, int]] = set()

#: Holds the shipped ``concepts/`` and ``conf/``: the checkout root, or the installed package data.
PROJECT_ROOT = data_root()
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


#: The one stream of a paired spec load (:func:`load_spec`).
PAIRED_STREAM = "paired"


def _generator(seed: int, name: str) -> torch.Generator:
    # crc32 of the set name: distinct sets get distinct streams, stable across processes.
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def stroke_masks(n: int, size: int, gen: torch.Generator, strokes: int = 3, width: float = 1.6) -> Tensor:
    """Random smooth strokes (thick quadratic curves), digit-like but shapeless.

    Returns:
        ``float32 [n, size, size]`` masks in ``[0, 1]``.
    """
    t = torch.linspace(0, 1, 24)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    grid = torch.stack([yy, xx], -1).view(1, 1, -1, 2)  # [1, 1, P, 2]
    ctrl = 4 + torch.rand(n, strokes, 3, 2, generator=gen) * (size - 8)  # 3 control points
    p0, p1, p2 = ctrl[:, :, 0], ctrl[:, :, 1], ctrl[:, :, 2]
    tt = t.view(1, 1, -1, 1)
    curve = (1 - tt) ** 2 * p0[:, :, None] + 2 * (1 - tt) * tt * p1[:, :, None] + tt**2 * p2[:, :, None]
    pts = curve.reshape(n, -1, 2)  # [n, strokes*24, 2]
    dist = torch.cdist(grid.expand(n, 1, -1, 2).squeeze(1), pts).amin(-1)  # [n, P]
    mask = torch.clamp(width + 0.5 - dist, 0, 1)
    return mask.view(n, size, size)


def blob_masks(n: int, size: int, gen: torch.Generator) -> Tensor:
    """Random filled ellipses. Returns ``float32 [n, size, size]`` in ``[0, 1]``."""
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    c = 6 + torch.rand(n, 2, generator=gen) * (size - 12)
    r = 3 + torch.rand(n, 2, generator=gen) * (size / 4)
    d = ((yy - c[:, 0, None, None]) / r[:, 0, None, None]) ** 2 + ((xx - c[:, 1, None, None]) / r[:, 1, None, None]) ** 2
    return torch.clamp((1.2 - d) * 3, 0, 1)


def _palette() -> Tensor:
    return PALETTE.float()


def _textures(size: int) -> Tensor:
    return make_textures(size).float()  # [K, 3, size, size]


def _fill(kind: str, mask: Tensor, gen: torch.Generator, params: Mapping[str, Any]) -> Tensor:
    """Colour masks ``[n, H, W]`` into ``float [n, 3, H, W]`` in 0..255."""
    n, size = mask.shape[0], mask.shape[-1]
    if kind == "palette":
        rgb = _palette()[int(params["index"])].view(1, 3, 1, 1).expand(n, 3, 1, 1)
    elif kind == "grey":
        rgb = (64 + torch.rand(n, 1, 1, 1, generator=gen) * 191).expand(n, 3, 1, 1)
    elif kind == "white":
        rgb = torch.full((n, 3, 1, 1), 255.0)
    elif kind == "random_rgb":
        rgb = torch.rand(n, 3, 1, 1, generator=gen) * 255
    elif kind == "random_palette":
        rgb = _palette()[torch.randint(0, 10, (n,), generator=gen)].view(n, 3, 1, 1)
    elif kind == "texture":
        return _textures(size)[int(params["index"])].unsqueeze(0) * mask.unsqueeze(1)
    elif kind == "random_texture":
        tex = _textures(size)
        return tex[torch.randint(0, len(tex), (n,), generator=gen)] * mask.unsqueeze(1)
    else:
        raise CdistillError(
            f"Unknown fill {kind!r}; use palette, grey, white, random_rgb, random_palette, "
            "texture or random_texture."
        )
    return rgb * mask.unsqueeze(1)


def _patch_images(n: int, size: int, gen: torch.Generator, params: Mapping[str, Any]) -> Tensor:
    """5x5 grey patches in a random corner on black (the DecoyMNIST cue).

    ``grey``: a fixed level 0..255; ``grey_class``: the training level of that class,
    255 - 25k; neither: a random level per image.
    """
    out = torch.zeros(n, 3, size, size)
    p = int(params.get("patch", 5))
    grey = params.get("grey")
    if params.get("grey_class") is not None:
        grey = 255 - 25 * int(params["grey_class"])
    levels = torch.full((n,), float(grey)) if grey is not None else torch.rand(n, generator=gen) * 255
    corner = torch.randint(0, 4, (n,), generator=gen)
    for i in range(n):
        y0 = 0 if int(corner[i]) in (0, 1) else size - p
        x0 = 0 if int(corner[i]) in (0, 2) else size - p
        out[i, :, y0 : y0 + p, x0 : x0 + p] = levels[i]
    return out


def _glyph_images(n: int, size: int, gen: torch.Generator, params: Mapping[str, Any]) -> Tensor:
    """Glyph ``params["glyph"]`` drawn over white strokes, away from their ink, as the
    MarkerMNIST data draws it (:func:`cdistill.concepts.glyphs.draw_glyphs`): ``float [n, 3, H, W]``."""
    if params.get("glyph") is None:
        raise CdistillError("A concept set of kind glyph needs 'glyph' (its id, 0..9).")
    strokes = (stroke_masks(n, size, gen) * 255).round().to(torch.uint8)
    glyph = torch.full((n,), int(params["glyph"]), dtype=torch.int64)
    img, _ = draw_glyphs(
        strokes, glyph, gen, int(params.get("level", 255)), int(params.get("glyph_size", 5)), int(params.get("copies", 1))
    )
    return img.float().unsqueeze(1).expand(n, 3, size, size)


def generate(kind: str, n: int, seed: int, name: str, *, size: int = 28, channels: int = 3,
             stream: str | None = None, **params: Any) -> Tensor:
    """Generate ``n`` concept images deterministically.

    Args:
        kind: ``strokes``, ``blobs`` (shapes filled by ``fill``), ``patch`` (decoy patch),
            ``glyph`` (a MarkerMNIST glyph over white strokes), ``noise`` (uniform noise).
        n: Number of images.
        seed: Spec seed; combined with ``name`` so every set has its own stream.
        name: Set name.
        stream: Draw from this stream instead of ``name``'s: sets that share a stream share
            their shapes image by image (the first random draw is the strokes or blobs).
        size: Image side.
        channels: 3 (RGB) or 1 (grey: the mean of RGB).
        **params: ``fill`` and its ``index``; ``grey`` for patches; ``glyph`` (id 0..9),
            ``level`` (grey, default 255), ``glyph_size`` (5) and ``copies`` (1) for glyphs.

    Returns:
        ``uint8 [n, channels, size, size]``.
    """
    if n < 1:
        raise CdistillError(f"Concept set {name!r} asks for n={n} images; it needs at least 1.")
    gen = _generator(seed, stream or name)
    if kind in ("strokes", "blobs"):
        mask = stroke_masks(n, size, gen) if kind == "strokes" else blob_masks(n, size, gen)
        img = _fill(str(params.get("fill", "white")), mask, gen, params)
    elif kind == "patch":
        img = _patch_images(n, size, gen, params)
    elif kind == "noise":
        img = torch.rand(n, 3, size, size, generator=gen) * 255
    elif kind == "glyph":
        img = _glyph_images(n, size, gen, params)
    else:
        raise CdistillError(
            f"Concept set {name!r}: unknown kind {kind!r}; use strokes, blobs, patch, glyph or noise."
        )
    if channels == 1:
        img = img.mean(1, keepdim=True)
    elif channels != 3:
        raise CdistillError(f"Concept set {name!r}: channels must be 1 or 3, got {channels}.")
    return img.round().clamp(0, 255).to(torch.uint8)


def _conversion_note(files: list[Path], sizes: list[tuple[int, int]], modes: list[str], size: int, channels: int) -> str:
    """What :func:`load_image_folder` did to the images that were not ``size x size`` with
    ``channels`` channels (empty when every image already was)."""
    notes = []
    off = [(f, wh) for f, wh in zip(files, sizes, strict=True) if wh != (size, size)]
    if off:
        f, (w, h) = off[0]
        notes.append(
            f"{len(off)} are not {size}x{size} (e.g. {f.name}: {w}x{h}) and were resized to {size}x{size} "
            "(bilinear; the aspect ratio is not kept)"
        )
    target = "L" if channels == 1 else "RGB"
    other = [(f, m) for f, m in zip(files, modes, strict=True) if m != target]
    if other:
        f, m = other[0]
        how = "to grey (luminance)" if channels == 1 else "to RGB (grey repeated, alpha dropped, palettes expanded)"
        notes.append(f"{len(other)} are not {channels}-channel {target} (e.g. {f.name}: mode {m}) and were converted {how}")
    return "; ".join(notes)


def load_image_folder(path: str | Path, *, size: int, channels: int, name: str | None = None) -> Tensor:
    """Read every image in a folder (any format Pillow reads), resized to ``size``.

    Images of another size are resized bilinearly to ``size x size`` (aspect ratio not kept)
    and images of another mode are converted to ``channels`` channels (``L`` or ``RGB``);
    one warning per folder says how many and what was done.

    Args:
        path: The folder.
        size: Image side wanted (the spec's ``image_size``, or the student's).
        channels: 1 or 3 (the spec's ``channels``, or the student's).
        name: The concept set's name (for the warning).

    Returns:
        ``uint8 [N, channels, size, size]``.

    Raises:
        CdistillError: Missing or empty folder, or an unreadable file (named).
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise CdistillError(f"Concept folder {str(folder)!r} does not exist; fix the concept set's path.")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CdistillError(
            f"Concept folder {str(folder)!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})."
        )
    mode = "L" if channels == 1 else "RGB"
    out = []
    sizes: list[tuple[int, int]] = []
    modes: list[str] = []
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.append(im.size)
                modes.append(im.mode)
                img = im.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
        except (UnidentifiedImageError, OSError) as err:
            raise CdistillError(f"Cannot read concept image {str(f)!r}: {err}") from err
        arr = np.asarray(img, dtype=np.uint8)
        out.append(torch.from_numpy(arr.copy()).view(size, size, channels).permute(2, 0, 1))
    note = _conversion_note(files, sizes, modes, size, channels)
    key = (str(folder.resolve()), size, channels)
    if note and key not in _WARNED:
        _WARNED.add(key)
        label = f"Concept set {name!r} ({str(folder)!r})" if name else f"Concept folder {str(folder)!r}"
        log.warning("%s: of its %d images, %s.", label, len(files), note)
    return torch.stack(out)


def expand_templates(sets: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Expand ``for_k`` templates into one entry per k."""
    out: dict[str, dict[str, Any]] = {}
    for name, entry in sets.items():
        entry = dict(entry)
        reps = entry.pop("for_k", None)
        if reps is None:
            out[name] = entry
            continue
        for k in range(int(reps)):
            out[name.format(k=k)] = {
                key: (val.format(k=k) if isinstance(val, str) else val) for key, val in entry.items()
            }
    return out


def load_spec(path: str | Path, *, channels: int | None = None, size: int | None = None,
              paired: bool = False) -> dict[str, Tensor]:
    """Build every concept set a YAML spec names.

    Args:
        path: The spec file.
        channels: Override the spec's channels (the student's input channels).
        size: Override the spec's image size.
        paired: Draw every generated set from one shared stream instead of one per set name, so
            image ``i`` of ``color_3``, of ``color_7`` and of ``grey`` has the same strokes (the
            paired target of the concept-only term). Folder sets are read as they are.

    Returns:
        Set name -> ``uint8 [N, C, H, W]``; a pool with ``split: S`` gives ``name/0`` ..
        ``name/S-1`` (disjoint).
    """
    spec_path = resolve_data_path(path)  # the shipped specs, from any working directory
    if not spec_path.is_file():
        raise CdistillError(f"Concept spec {str(spec_path)!r} does not exist; fix concepts.spec.")
    spec = yaml.safe_load(spec_path.read_text()) or {}
    if not spec.get("sets"):
        raise CdistillError(f"Concept spec {str(spec_path)!r} lists no sets (key 'sets').")
    seed = int(spec.get("seed", 0))
    channels = int(channels or spec.get("channels", 3))
    size = int(size or spec.get("image_size", 28))
    result: dict[str, Tensor] = {}
    for name, entry in expand_templates(spec["sets"]).items():
        entry = dict(entry)
        split = int(entry.pop("split", 0))
        if "folder" in entry:
            if paired:  # image i of two folders is not one shape with two cue values
                raise CdistillError(
                    f"Concept set {name!r} in {str(spec_path)!r} is a folder, and paired concept images "
                    "(model.outputs.target=paired) need generated sets drawn as pairs; use another "
                    "model.outputs.target (uniform, the default) with folder sets."
                )
            folder = Path(entry["folder"])
            folder = folder if folder.is_absolute() else spec_path.parent / folder
            images = load_image_folder(folder, size=size, channels=channels, name=name)
        else:
            images = generate(
                entry.pop("kind"), int(entry.pop("n")), seed, name, size=size, channels=channels,
                stream=PAIRED_STREAM if paired else None, **entry,
            )
        if split:
            per = len(images) // split
            if per < 2:
                raise CdistillError(f"Concept pool {name!r} has {len(images)} images: too few for split={split}.")
            for s in range(split):
                result[f"{name}/{s}"] = images[s * per : (s + 1) * per]
        else:
            result[name] = images
    return result


def preprocess(images: Tensor, normalize: Callable[[Tensor], Tensor], *, channels: int, size: int) -> Tensor:
    """Give concept images the student's preprocessing.

    Args:
        images: ``uint8 [N, C', H', W']``.
        normalize: The datamodule's normalisation of ``[0, 1]`` images.
        channels: The student's input channels (grey -> RGB by repetition; RGB -> grey by mean).
        size: The student's input size.

    Returns:
        ``float32 [N, channels, size, size]``.
    """
    if images.numel() == 0:
        raise CdistillError("Empty concept set: no images to preprocess.")
    x = images.float() / 255.0
    if x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise CdistillError(f"Concept images have {x.shape[1]} channels; the student takes {channels}.")
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return normalize(x)

