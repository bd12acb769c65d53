"""Which layer a concept method acts on when the user writes ``model.layer=auto``: the
structural part of the rule (docs/methods.md §2.10).

:func:`stem_layer` is the stem, the first pooling module after the first non-linearity (``pool1``
of the MNIST CNN, ``maxpool`` of a ResNet), else the first non-linearity. Why early: a concept
image's features there are local, so at a cue's position they are the features the cue has
inside a training image; after the first non-linearity, because pre-activation maps of a single
convolution do not separate concepts that its ReLU makes separable.

:func:`candidate_layers` lists where ``auto`` may land, in forward order: the stem, then every
later spatial pooling and every later stage (a top-level block holding a non-linearity:
``layer1 .. layer4`` of a ResNet). Which candidate is used is decided from the base model's CAV
scan (:mod:`cdistill.concepts.layer_choice`): the earliest one where the bias concepts are
linearly readable. Models are walked in ``named_modules()`` order (definition order), which is
the forward order of every student cdistill builds.
"""

from __future__ import annotations

from torch import nn

from cdistill.errors import CdistillError

AUTO = "auto"
_ACTIVATIONS = (nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Mish)
#: Poolings that keep a map; adaptive ones pool the head's features (or a squeeze-excite gate's).
_SPATIAL_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d)


def is_auto(layer: object) -> bool:
    """Whether a configured layer is ``auto`` (to be chosen by :mod:`cdistill.concepts.layer_choice`)."""
    return str(layer) == AUTO


def stem_layer(model: nn.Module) -> str:
    """The module path of the first pooling after the first non-linearity (see the module
    docstring); adaptive (global) poolings do not count: they pool the head's features."""
    first_activation = None
    for name, module in model.named_modules():
        if not name:
            continue
        if first_activation is None and isinstance(module, _ACTIVATIONS):
            first_activation = name
        elif first_activation is not None and isinstance(module, _SPATIAL_POOLS):
            return name
    if first_activation is None:
        raise CdistillError("model.layer=auto: the student has no activation module (it may apply F.relu "
                            "functionally); set model.layer to a module path.")
    return first_activation


def _holds_activation(module: nn.Module) -> bool:
    return any(isinstance(m, _ACTIVATIONS) for m in module.modules())


def _is_block_sequence(module: nn.Module) -> bool:
    """A ``Sequential``/``ModuleList`` of >= 2 elements that each hold a non-linearity."""
    kids = list(module.children())
    return isinstance(module, nn.Sequential | nn.ModuleList) and len(kids) >= 2 and all(map(_holds_activation, kids))


def _stages(model: nn.Module) -> list[str]:
    """The top-level stages: direct children with submodules, one a non-linearity. When exactly
    one of them is a block sequence (a ViT's ``blocks``, an EfficientNet's), its elements are the
    stages instead; several (a ResNet's ``layer1 .. layer4``, each a sequence of blocks) stay whole."""
    stages = [(n, m) for n, m in model.named_children() if any(True for _ in m.children()) and _holds_activation(m)]
    sequences = [n for n, m in stages if _is_block_sequence(m)]
    if len(sequences) != 1:
        return [n for n, _ in stages]
    out: list[str] = []
    for name, module in stages:
        out += [f"{name}.{k}" for k, _ in module.named_children()] if name == sequences[0] else [name]
    return out


def candidate_layers(model: nn.Module) -> list[str]:
    """Where ``model.layer=auto`` may land, in forward order.

    The stem (:func:`stem_layer`), then each later spatial pooling (``MaxPool``/``AvgPool``;
    adaptive and global poolings feed the head and are never candidates) and each later stage
    (a direct child of ``model`` holding a non-linearity: ``layer1 .. layer4`` of a ResNet; a
    lone block sequence counts by its elements: ``blocks.0 ..`` of a ViT). A stage that holds
    the stem is not later than it; when the stem lies inside one element of a block sequence
    (a ViT's first MLP activation), that element's output is the first candidate instead.
    Outputs that are not maps (flattened head features, logits) are dropped by shape where
    activations are at hand (:func:`cdistill.concepts.layer_choice.choose_layer`).

    Raises:
        CdistillError: ``model`` has no activation module (see :func:`stem_layer`).
    """
    stem = stem_layer(model)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    stages = _stages(model)
    holder = next((s for s in stages if stem.startswith(f"{s}.")), None)
    if holder is not None and "." in holder:  # an element of a block sequence
        stem = holder
    later = [n for n, m in model.named_modules() if order[n] > order[stem] and isinstance(m, _SPATIAL_POOLS)]
    later += [s for s in stages if order[s] > order[stem] and not stem.startswith(f"{s}.")]
    return [stem, *sorted(dict.fromkeys(later), key=order.__getitem__)]


def resolve_layer(model: nn.Module, layer: str) -> str:
    """``layer``, or the :func:`stem_layer` of ``model`` for ``auto``: the structural answer,
    used where no data is at hand (a module built directly); with data, ``auto`` is chosen by
    the CAV scan (:func:`cdistill.concepts.layer_choice.choose_layer`)."""
    return stem_layer(model) if is_auto(layer) else str(layer)
