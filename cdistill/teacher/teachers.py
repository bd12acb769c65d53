"""Frozen teachers: any timm or torchvision model (or a cdistill one) read at a named layer.

A :class:`Teacher` is only needed before training (docs/methods.md §2.5): it turns concept
images into feature maps, which the mapping autoencoder carries into the student's layer
space. It is therefore never a submodule of the LightningModule: it is outside the
optimizer, outside DDP and outside checkpoints by construction, and it is frozen (no
parameter requires grad, and ``train()`` keeps it in eval mode).

Every teacher gets its own preprocessing (resolution, channels, normalisation), independent
of the student's. CNN layers give ``[N, C, H, W]``; ViT layers give tokens ``[N, T, D]``,
whose prefix tokens (class, registers) are dropped and the rest reshaped to ``[N, D, h, w]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdistill.errors import CdistillError
from cdistill.models.students import create_student, load_weights
from cdistill.utils.capture import collect_activations, resolve_module
from cdistill.utils.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TeacherFactory = Callable[..., nn.Module]
#: cdistill's own teachers (``cdistill:<name>``), registered when :mod:`cdistill.teacher` is
#: imported (it imports :mod:`cdistill.teacher.offline`).
TEACHERS: Registry[TeacherFactory] = Registry("teacher", "Fix model.teacher.name.")
register_teacher = TEACHERS.register


def tokens_to_grid(tokens: Tensor, prefix: int | None = None) -> Tensor:
    """ViT tokens ``[N, T, D]`` -> patch grid ``[N, D, h, w]``, prefix tokens dropped.

    Args:
        tokens: Layer output.
        prefix: Number of leading non-patch tokens (class token, registers); ``None``:
            inferred as 0 or 1, whichever leaves a square number of patch tokens.

    Raises:
        CdistillError: The patch tokens do not form a square grid.
    """
    n, t, d = tokens.shape
    if prefix is None:
        prefix = next((p for p in (0, 1) if math.isqrt(t - p) ** 2 == t - p), -1)
    side = math.isqrt(max(t - prefix, 0))
    if prefix < 0 or side * side != t - prefix:
        raise CdistillError(
            f"Teacher tokens [N, {t}, {d}] do not form a square patch grid after dropping "
            f"{max(prefix, 0)} prefix token(s); set model.teacher.prefix_tokens."
        )
    return tokens[:, prefix:].transpose(1, 2).reshape(n, d, side, side)


class Teacher(nn.Module):
    """A frozen model, its feature layer and its own preprocessing.

    Args:
        model: The network (weights already loaded).
        layer: Module path whose output is the feature map.
        image_size: The teacher's input side (``None``: the concept images' own size).
        mean: Per-channel normalisation mean of ``[0, 1]`` images.
        std: Per-channel normalisation std.
        in_chans: Channels the teacher takes (grey images are repeated to RGB).
        resize: Resize images to ``image_size``; if False, images of another size are an error
            (for models with a fixed input size, e.g. ViTs with absolute position embeddings).
        prefix_tokens: ViT prefix tokens to drop (``None``: inferred).
        name: For messages.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: str,
        *,
        image_size: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        in_chans: int = 3,
        resize: bool = True,
        prefix_tokens: int | None = None,
        name: str = "teacher",
    ) -> None:
        super().__init__()
        resolve_module(model, layer)  # a wrong layer fails now, listing close names
        if len(mean) != in_chans or len(std) != in_chans:
            raise CdistillError(
                f"Teacher {name!r}: mean/std have {len(mean)}/{len(std)} entries for {in_chans} "
                "input channels; fix model.teacher.mean / model.teacher.std."
            )
        self.model = model
        self.name, self.layer = name, layer
        # How images are prepared for the model and its output read (see features()).
        self.image_size, self.in_chans, self.resize, self.prefix_tokens = image_size, in_chans, resize, prefix_tokens
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.requires_grad_(False)
        super().train(False)

    mean: Tensor
    std: Tensor

    def train(self, mode: bool = True) -> Teacher:
        """Stay in eval mode whatever is asked: the teacher never trains (dropout, BN stats)."""
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """``uint8 [N, C, H, W]`` concept images -> the teacher's input ``float32 [N, in_chans, S, S]``.

        Raises:
            CdistillError: Wrong channel count, or a size the teacher cannot take with ``resize`` off.
        """
        if images.dim() != 4:
            raise CdistillError(f"Teacher {self.name!r} takes images [N, C, H, W]; got shape {tuple(images.shape)}.")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if x.shape[1] != self.in_chans:
            if x.shape[1] == 1:
                x = x.expand(-1, self.in_chans, -1, -1)
            elif self.in_chans == 1:
                x = x.mean(1, keepdim=True)
            else:
                raise CdistillError(f"Concept images have {x.shape[1]} channels; teacher {self.name!r} takes {self.in_chans}.")
        size = self.image_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            if not self.resize:
                raise CdistillError(
                    f"Concept images are {tuple(x.shape[-2:])} but teacher {self.name!r} takes "
                    f"{size}x{size}: set model.teacher.resize=true, or give images of that size."
                )
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def features(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """Feature maps of ``images`` at ``layer``.

        Args:
            images: ``uint8 [N, C, H, W]`` (or float in ``[0, 1]``).
            batch_size: Images per forward.

        Returns:
            ``float32 [N, C_t, h, w]`` (ViT tokens as a grid), or ``[N, D]`` for a vector layer.
        """
        device = self.mean.device
        batches = [self.preprocess(images[i : i + batch_size].to(device)) for i in range(0, len(images), batch_size)]
        acts = collect_activations(self.model, self.layer, batches, flatten=False)
        if acts.dim() == 3:
            acts = tokens_to_grid(acts, self.prefix_tokens)
        return acts.float()

    def forward(self, images: Tensor) -> Tensor:
        return self.features(images)


def _library_defaults(model: nn.Module) -> dict[str, Any]:
    """Input size and normalisation a timm model declares (empty for others)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    out: dict[str, Any] = {}
    if "input_size" in cfg:
        out["image_size"] = int(cfg["input_size"][-1])
    if "mean" in cfg and "std" in cfg:
        out["mean"], out["std"] = tuple(cfg["mean"]), tuple(cfg["std"])
    return out


def create_teacher(
    name: str,
    layer: str,
    *,
    checkpoint_path: str | None = None,
    pretrained: bool = False,
    image_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    in_chans: int = 3,
    resize: bool = True,
    prefix_tokens: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> Teacher:
    """Build a frozen teacher.

    Args:
        name: ``cdistill:<name>`` (a registered teacher, e.g. ``cdistill:digits_ae``),
            ``timm:<model>`` (or a bare timm name) or ``torchvision:<model>``.
        layer: Module path of the feature layer (e.g. ``blocks.11``, ``layer3``, ``encoder.conv2``).
        checkpoint_path: Local weights (state dict or Lightning checkpoint), loaded with
            ``weights_only=True``; a missing file or an architecture mismatch is an error.
        pretrained: Fetch the library's weights from the hub (needs network; only when asked).
        image_size: Input side; ``None``: the model's declared size (timm), else the images' own.
        mean: Normalisation mean (``None``: the model's declared one, else ImageNet's).
        std: Normalisation std (likewise).
        in_chans: Input channels of the teacher.
        resize: Resize concept images to ``image_size`` (see :class:`Teacher`).
        prefix_tokens: ViT prefix tokens (``None``: inferred).
        model_kwargs: Extra constructor arguments (e.g. ``img_size`` of a timm ViT).

    Returns:
        The teacher, frozen, in eval mode, on CPU.
    """
    kw = dict(model_kwargs or {})
    if name.startswith("cdistill:"):
        short = name.split(":", 1)[1]
        if short not in TEACHERS:
            raise CdistillError(f"Unknown teacher {name!r}; cdistill teachers: {TEACHERS.names()}. Fix model.teacher.name.")
        if pretrained:
            raise CdistillError(f"Teacher {name!r} has no hub weights; give model.teacher.checkpoint_path.")
        model = TEACHERS.get(short)(**kw)
    else:
        kw.setdefault("num_classes", 1000)  # keep the library head: a teacher is read at a layer
        model = create_student(name, in_chans=in_chans, pretrained=pretrained, **kw)
    if checkpoint_path:
        load_weights(model, checkpoint_path, role="teacher", key="model.teacher.checkpoint_path")
    defaults = _library_defaults(model) if not name.startswith("cdistill:") else {}
    defaults.update(getattr(model, "preprocessing", {}))
    return Teacher(
        model,
        layer,
        image_size=image_size if image_size is not None else defaults.get("image_size"),
        mean=tuple(mean) if mean is not None else defaults.get("mean", IMAGENET_MEAN),
        std=tuple(std) if std is not None else defaults.get("std", IMAGENET_STD),
        in_chans=in_chans,
        resize=resize,
        prefix_tokens=prefix_tokens,
        name=name,
    )
