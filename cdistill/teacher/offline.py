"""An offline stand-in for a large pretrained teacher on the biased-MNIST benchmarks.

The paper's teacher is DINO ViT-B/8, which cannot be downloaded here. This one is trained by
cdistill itself, **without class labels and without MNIST digits**, as a denoising
autoencoder over procedural strokes and blobs whose fills are drawn at random (any RGB
colour, the ColorMNIST palette, the TextureMNIST textures, grey levels) and which carry a
DecoyMNIST-style corner patch of random grey at random. In its data no cue predicts any other,
so its features encode colour, texture, patch and stroke shape as separate things: the
property the paper wants from a teacher ("knows concepts better than the biased student").
It never sees a test image of any benchmark.

Its encoder mirrors the geometry of the MNIST CNN (5x5 valid convs, 2x2 pools), so its grids
line up with the student's: ``encoder.conv1`` is 24x24 like the student's ``conv1``, and
``encoder.conv2`` is 8x8 like ``conv2``. Trained weights are cached under
``<cache_dir>/teachers/digits_ae-<hash>.pt`` keyed by the training settings; a real run
would instead use e.g. ``conf/teacher/dino_vitb8.yaml`` with a local checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdistill.concepts.palette import PALETTE
from cdistill.concepts.sets import blob_masks, stroke_masks
from cdistill.concepts.textures import make_textures
from cdistill.teacher.teachers import register_teacher
from cdistill.utils import build_file

log = logging.getLogger(__name__)
#: Bump when the architecture or the training recipe changes: cached weights are then retrained.
VERSION = 1
TRAIN_DEFAULTS: dict[str, Any] = {"images": 10000, "epochs": 4, "batch_size": 128, "lr": 2e-3, "noise": 0.1, "seed": 0}


class DigitsAutoencoder(nn.Module):
    """Conv autoencoder on 28x28 RGB images; encoder layers are addressable by path.

    ``encoder``: conv1 (3->32, k5) -> relu1 -> pool1 -> conv2 (32->64, k5) -> relu2 -> pool2
    (``[64, 4, 4]``); ``decoder`` upsamples back to ``[3, 28, 28]``.
    """

    #: Input normalisation of this teacher (used by :func:`cdistill.teacher.teachers.create_teacher`).
    preprocessing: ClassVar[dict[str, Any]] = {"image_size": 28, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential()
        self.encoder.add_module("conv1", nn.Conv2d(3, width, 5))
        self.encoder.add_module("relu1", nn.ReLU())
        self.encoder.add_module("pool1", nn.MaxPool2d(2))
        self.encoder.add_module("conv2", nn.Conv2d(width, 2 * width, 5))
        self.encoder.add_module("relu2", nn.ReLU())
        self.encoder.add_module("pool2", nn.MaxPool2d(2))
        self.decoder = nn.Sequential(
            nn.Upsample(scale_factor=2), nn.ConvTranspose2d(2 * width, width, 5), nn.ReLU(),  # 4 -> 8 -> 12
            nn.Upsample(scale_factor=2), nn.ConvTranspose2d(width, 3, 5),  # 12 -> 24 -> 28
        )

    def forward(self, x: Tensor) -> Tensor:
        """``[N, 3, 28, 28]`` normalised images -> their reconstruction, same shape."""
        return self.decoder(self.encoder(x))


@register_teacher("digits_ae")
def _digits_ae(width: int = 32) -> nn.Module:
    return DigitsAutoencoder(width)


def bias_free_images(n: int, seed: int) -> Tensor:
    """Procedural training images of the teacher: no label, no cue correlated with another.

    Returns:
        ``uint8 [n, 3, 28, 28]``.
    """
    gen = torch.Generator().manual_seed(seed)
    half = n // 2
    mask = torch.cat([stroke_masks(half, 28, gen), blob_masks(n - half, 28, gen)]).unsqueeze(1)  # [n, 1, 28, 28]
    mask = mask[torch.randperm(n, generator=gen)]
    kind = torch.randint(0, 4, (n,), generator=gen)  # 0 random RGB, 1 palette, 2 texture, 3 grey
    fill = torch.rand(n, 3, 1, 1, generator=gen).expand(n, 3, 28, 28) * 255
    fill = torch.where((kind == 1).view(-1, 1, 1, 1), PALETTE.float()[torch.randint(0, 10, (n,), generator=gen)].view(n, 3, 1, 1), fill)
    textures = make_textures(28).float()
    fill = torch.where((kind == 2).view(-1, 1, 1, 1), textures[torch.randint(0, len(textures), (n,), generator=gen)], fill)
    grey = (64 + torch.rand(n, 1, 1, 1, generator=gen) * 191).expand(n, 3, 28, 28)
    fill = torch.where((kind == 3).view(-1, 1, 1, 1), grey, fill)
    img = fill * mask
    # A corner patch on half of the images (grey level and corner at random).
    has_patch = torch.rand(n, generator=gen) < 0.5
    corner = torch.randint(0, 4, (n,), generator=gen)
    level = torch.rand(n, generator=gen) * 255
    for i in torch.nonzero(has_patch).flatten().tolist():
        y0 = 0 if int(corner[i]) < 2 else 23
        x0 = 0 if int(corner[i]) % 2 == 0 else 23
        img[i, :, y0 : y0 + 5, x0 : x0 + 5] = level[i]
    return img.round().clamp(0, 255).to(torch.uint8)


def train_digits_ae(settings: Mapping[str, Any]) -> tuple[DigitsAutoencoder, list[float]]:
    """Train the autoencoder (denoising MSE, no labels).

    Args:
        settings: :data:`TRAIN_DEFAULTS` keys (``images``, ``epochs``, ``batch_size``, ``lr``,
            ``noise``, ``seed``) and optionally ``width``.

    Returns:
        The model (eval mode) and the mean training loss of each epoch.
    """
    s = {**TRAIN_DEFAULTS, **settings}
    images = bias_free_images(int(s["images"]), int(s["seed"]))
    x_all = (images.float() / 255.0 - 0.5) / 0.5
    with torch.random.fork_rng(devices=[]):  # seeded init; the caller's RNG stream is left alone
        torch.manual_seed(int(s["seed"]))
        model = DigitsAutoencoder(int(s.get("width", 32)))
    opt = torch.optim.Adam(model.parameters(), lr=float(s["lr"]))
    gen = torch.Generator().manual_seed(int(s["seed"]) + 1)
    history = []
    for epoch in range(int(s["epochs"])):
        order = torch.randperm(len(x_all), generator=gen)
        total = 0.0
        for start in range(0, len(order), int(s["batch_size"])):
            x = x_all[order[start : start + int(s["batch_size"])]]
            noisy = x + float(s["noise"]) * torch.randn(x.shape, generator=gen)
            loss = F.mse_loss(model(noisy), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(x)
        history.append(total / len(x_all))
        log.info("offline teacher digits_ae: epoch %d reconstruction MSE %.4f", epoch, history[-1])
    return model.eval(), history


def settings_hash(settings: Mapping[str, Any]) -> str:
    """Short hash of the training settings and :data:`VERSION` (the cache key)."""
    blob = json.dumps({"version": VERSION, **TRAIN_DEFAULTS, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    """Read cached weights; raises on a truncated or corrupt file (then they are retrained)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError("not a state dict of tensors")
    return state


def ensure_digits_ae(cache_dir: str | Path, settings: Mapping[str, Any] | None = None) -> Path:
    """Path of trained ``digits_ae`` weights for ``settings``; trains and caches them if missing.

    The file is a plain state dict (loadable with ``weights_only=True``), checked by loading it
    on every call: a missing, truncated or corrupt file is (re)trained under a lock and renamed
    into place (:func:`cdistill.utils.build_file`), so concurrent processes (DDP ranks, runs
    started together) train it once and never read a half-written file.
    """
    settings = dict(settings or {})
    path = Path(cache_dir).expanduser() / "teachers" / f"digits_ae-{settings_hash(settings)}.pt"

    def build(tmp: Path) -> dict[str, Tensor]:
        log.info("training the offline teacher digits_ae (cached at %s)", path)
        model, _ = train_digits_ae(settings)
        state = model.state_dict()
        torch.save(state, tmp)
        return state

    build_file(path, build, _load_state_dict, what="offline teacher weights")
    return path
