"""Student models: a small registry plus any timm or torchvision model by name.

``create_student("mnist_cnn")`` builds the paper's MNIST CNN; ``"timm:resnet18"`` (or a bare
timm name) and ``"torchvision:resnet18"`` build library models. Nothing is downloaded unless
``pretrained=True`` is asked for explicitly; ``checkpoint_path`` loads local weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from cdistill.errors import CdistillError, unknown_name
from cdistill.models.mnist_cnn import MnistCNN
from cdistill.utils.checkpoint_files import load_torch_file
from cdistill.utils.registry import Registry

StudentFactory = Callable[..., nn.Module]
#: cdistill's own students (timm and torchvision names come on top, see :func:`create_student`).
STUDENTS: Registry[StudentFactory] = Registry("student", "Set model.student.name to a registered name.")
register_student = STUDENTS.register


@register_student("mnist_cnn")
def _mnist_cnn(in_chans: int = 3, num_classes: int = 10, image_size: int = 28) -> nn.Module:
    return MnistCNN(in_chans=in_chans, num_classes=num_classes, image_size=image_size)


@register_student("mnist_cnn_gray")
def _mnist_cnn_gray(in_chans: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Module:
    return MnistCNN(in_chans=in_chans, num_classes=num_classes, image_size=image_size)


def first_conv(model: nn.Module) -> nn.Conv2d | None:
    """The first ``Conv2d`` in module order (the one that sees the image), if any."""
    return next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)


def check_input_channels(model: nn.Module, channels: int, model_name: str = "student") -> None:
    """Raise a clear error when ``model`` cannot take ``channels``-channel images."""
    conv = first_conv(model)
    if conv is not None and conv.in_channels != channels:
        raise CdistillError(
            f"The data gives {channels}-channel images but {model_name} expects "
            f"{conv.in_channels} channels. Set model.student.in_chans={channels} "
            f"(or use a model built for {channels}-channel input)."
        )


def check_input_size(model: nn.Module, size: int, model_name: str = "student") -> None:
    """Raise a clear error when ``model`` declares a fixed input side (an ``image_size``
    attribute, as the MNIST CNN has) other than the data's ``size``."""
    own = getattr(model, "image_size", None)
    if isinstance(own, int) and own != int(size):
        raise CdistillError(
            f"The data gives {size}x{size} images but {model_name} was built for {own}x{own}. "
            f"Set model.student.image_size={size} (or data.image_size={own} where the data has it)."
        )


def _timm_student(name: str, num_classes: int, in_chans: int, pretrained: bool, **kw: Any) -> nn.Module:
    import timm

    try:
        return timm.create_model(
            name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kw
        )
    except Exception as err:  # timm raises many kinds when a hub download fails
        if pretrained:
            raise CdistillError(
                f"Could not get pretrained weights for timm model {name!r} ({err}). Offline? "
                "Set model.student.pretrained=false and model.student.checkpoint_path=<local file>."
            ) from err
        raise


def _replace_first_conv(model: nn.Module, in_chans: int) -> None:
    """Swap the first conv for one with ``in_chans`` inputs (torchvision has no in_chans)."""
    conv = first_conv(model)
    if conv is None or conv.in_channels == in_chans:
        return
    new = nn.Conv2d(
        in_chans,
        conv.out_channels,
        kernel_size=conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    for path, module in model.named_modules():
        if module is conv:
            parent_path, _, attr = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            setattr(parent, attr, new)
            return


def _torchvision_student(name: str, num_classes: int, in_chans: int, pretrained: bool, **kw: Any) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models()
    if name not in available:
        raise unknown_name(
            "torchvision model", name, available, "Set model.student.name=torchvision:<name>."
        )
    weights = "DEFAULT" if pretrained else None
    try:
        if pretrained:
            # Pretrained heads have 1000 classes: load, then replace the head below.
            model = torchvision.models.get_model(name, weights=weights, **kw)
        else:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
    except Exception as err:
        if pretrained:
            raise CdistillError(
                f"Could not get pretrained weights for torchvision model {name!r} ({err}). Offline? "
                "Set model.student.pretrained=false and model.student.checkpoint_path=<local file>."
            ) from err
        raise
    if pretrained and num_classes != 1000:
        head = getattr(model, "fc", None)
        if not isinstance(head, nn.Linear):
            raise CdistillError(
                f"Cannot resize the head of pretrained torchvision model {name!r} automatically; "
                "use a timm model or load a checkpoint with model.student.checkpoint_path."
            )
        model.fc = nn.Linear(head.in_features, num_classes)
    _replace_first_conv(model, in_chans)
    return model


def head_keys(model: nn.Module) -> set[str]:
    """State-dict keys of the model's last ``nn.Linear`` (its classifier head), if any."""
    heads = [path for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {f"{heads[-1]}.{p}" for p, _ in model.get_submodule(heads[-1]).named_parameters()} if heads else set()


def load_weights(
    model: nn.Module, checkpoint_path: str | Path, *, role: str = "student", key: str = "model.student.checkpoint_path",
    fresh_head: bool = False,
) -> None:
    """Load a local state dict (plain, or a cdistill/Lightning checkpoint) into ``model``.

    Uses ``torch.load(weights_only=True)``: no arbitrary pickles are executed.

    Args:
        model: The freshly built model.
        checkpoint_path: The file.
        role: ``student`` or ``teacher`` (for error messages).
        key: The config key that gave the path (for error messages).
        fresh_head: Keep the model's own classifier head (its last ``nn.Linear``) where the
            file's has another shape, e.g. ImageNet weights (1000 classes) for a 2-class task.
    """
    path = Path(checkpoint_path).expanduser()
    if not path.is_file():
        raise CdistillError(
            f"{role.capitalize()} checkpoint {str(path)!r} does not exist. "
            f"Fix {key} (or set it to null to start from scratch)."
        )
    state = load_torch_file(path, key, f"Give {key} a run's student.pt (or a checkpoints/*.ckpt of a cdistill run).")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CdistillError(f"{str(path)!r} does not hold a state dict.")
    # A Lightning checkpoint of a cdistill module stores the student under "student.".
    if any(k.startswith("student.") for k in state):
        state = {k[len("student.") :]: v for k, v in state.items() if k.startswith("student.")}
    own = model.state_dict()
    if fresh_head:
        head = head_keys(model)
        state = {k: v for k, v in state.items() if k not in head or tuple(v.shape) == tuple(own[k].shape)}
        state |= {k: own[k] for k in head if k not in state}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        raise CdistillError(
            f"Checkpoint {str(path)!r} does not match the {role} architecture: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}. "
            f"Check the {role}'s name / num_classes / in_chans against the checkpoint ({key})."
        )
    model.load_state_dict(state)


def create_student(
    name: str,
    *,
    num_classes: int = 10,
    in_chans: int | None = None,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    init_path: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a student model by name.

    Args:
        name: A registered name (``mnist_cnn``, ``mnist_cnn_gray``), ``timm:<model>`` or a bare
            timm model name, or ``torchvision:<model>``.
        num_classes: Number of output logits.
        in_chans: Input image channels (None: the model's own default, 3 for library models).
        pretrained: Fetch library weights from the hub (needs network; off by default).
        checkpoint_path: Local state dict to load after construction (the whole model).
        init_path: Local weights to start from when no ``checkpoint_path`` is given, e.g. a
            torchvision ImageNet file: every tensor must match except the classifier head,
            which stays freshly initialised where its shape differs (another class count).
        **kwargs: Passed to the underlying constructor.

    Returns:
        The model, in train mode, on CPU.
    """
    if name in STUDENTS:
        if pretrained:
            raise CdistillError(
                f"Student {name!r} has no pretrained weights; use model.student.checkpoint_path."
            )
        if in_chans is not None:
            kwargs["in_chans"] = in_chans
        model = STUDENTS.get(name)(num_classes=num_classes, **kwargs)
    elif name.startswith("torchvision:"):
        model = _torchvision_student(
            name.split(":", 1)[1], num_classes, in_chans or 3, pretrained, **kwargs
        )
    else:
        import timm

        timm_name = name.split(":", 1)[1] if name.startswith("timm:") else name
        if not timm.is_model(timm_name):
            raise unknown_name(
                "student model",
                name,
                [*STUDENTS, *timm.list_models()],
                "Set model.student.name to a registered name, timm:<model> or torchvision:<model>.",
            )
        model = _timm_student(timm_name, num_classes, in_chans or 3, pretrained, **kwargs)
    if checkpoint_path:
        load_weights(model, checkpoint_path)
    elif init_path:
        load_weights(model, init_path, key="model.student.init_path", fresh_head=True)
    return model
