"""Which layer a concept method acts on when the user writes ``model.layer=auto``.

The rule (docs/methods.md §2.10): the stem, i.e. the first pooling module after the first
non-linearity (``pool1`` of the MNIST CNN, ``maxpool`` of a torchvision ResNet), else the first
non-linearity. Why early: a concept image's features there are local, so at a cue's position
they are the features the cue has inside a training image; after the first non-linearity,
because pre-activation maps of a single convolution do not separate concepts that its ReLU
makes separable. Models are walked in ``named_modules()`` order (definition order).
"""

from __future__ import annotations

from torch import nn

from cdistill.errors import CdistillError

AUTO = "auto"
_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Mish)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def stem_layer(model: nn.Module) -> str:
    """The module path of the first pooling after the first non-linearity (see the module docstring)."""
    first_activation = None
    for name, module in model.named_modules():
        if not name:
            continue
        if first_activation is None and isinstance(module, _ACTIVATIONS):
            first_activation = name
        elif first_activation is not None and isinstance(module, _POOLS):
            return name
    if first_activation is None:
        raise CdistillError("model.layer=auto: the student has no activation module (it may apply F.relu "
                            "functionally); set model.layer to a module path.")
    return first_activation


def resolve_layer(model: nn.Module, layer: str) -> str:
    """``layer``, or the :func:`stem_layer` of ``model`` for ``auto``."""
    return stem_layer(model) if str(layer) == AUTO else str(layer)
