"""Capture intermediate activations of a model by module path, with forward hooks.

A layer is named by its path in ``model.named_modules()`` (e.g. ``"layer4"``,
``"layer4.1.conv2"``, ``"blocks.5"``). A module that returns a tuple or list needs an
element index: ``"path:0"`` picks element 0 of its output.

Hooks live only inside the :func:`capture` context manager and are removed on exit, also
when the body raises, so a model is never left with stray hooks.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from cdistill.errors import CdistillError, unknown_name

_LAYER_FIX = (
    "Set the concept layer to one of the module paths of the model (see model.named_modules())."
)


def parse_layer(spec: str) -> tuple[str, int | None]:
    """Split a layer spec ``"path"`` or ``"path:index"`` into ``(path, index)``."""
    path, sep, index = spec.rpartition(":")
    if sep and index.lstrip("-").isdigit():
        return path, int(index)
    return spec, None


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """Return the submodule of ``model`` at ``path`` (``""`` is the model itself).

    An ``":index"`` suffix (see :func:`parse_layer`) is accepted and ignored here.

    Raises:
        CdistillError: ``path`` is not a module path; the message lists close names.
    """
    module_path, _ = parse_layer(path)
    try:
        return model.get_submodule(module_path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        raise unknown_name("layer", module_path, names, _LAYER_FIX) from None


class ActivationStore(Mapping[str, Tensor]):
    """Read-only mapping layer spec -> latest output of that layer (filled by hooks).

    If a module runs several times in one forward (a shared module), the last call wins.
    """

    def __init__(self, layers: Sequence[str]) -> None:
        self._layers = list(layers)
        self._data: dict[str, Tensor] = {}

    def __getitem__(self, layer: str) -> Tensor:
        if layer in self._data:
            return self._data[layer]
        if layer in self._layers:
            raise CdistillError(
                f"Layer {layer!r} has produced no output yet: run a forward pass of the "
                "model inside the `with capture(...)` block before reading it (and check "
                "that the layer is on the forward path)."
            )
        raise unknown_name("captured layer", layer, self._layers, "Read one of the captured layers.")

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def _set(self, layer: str, value: Tensor) -> None:
        self._data[layer] = value

    def clear(self) -> None:
        """Forget all captured outputs (the hooks stay registered)."""
        self._data.clear()


def _select_output(layer: str, output: Any, index: int | None) -> Tensor:
    """Pick the tensor to capture from a module's output, or raise a clear error."""
    if index is not None:
        if not isinstance(output, (tuple, list)):
            raise CdistillError(
                f"Layer {layer!r} has an index but its module returned "
                f"{type(output).__name__}, not a tuple or list; drop the ':index' suffix."
            )
        if not -len(output) <= index < len(output):
            raise CdistillError(
                f"Layer {layer!r}: index {index} is out of range for an output of "
                f"{len(output)} elements."
            )
        output = output[index]
    if isinstance(output, (tuple, list)):
        raise CdistillError(
            f"Layer {layer!r} returns a {type(output).__name__} of {len(output)} elements, "
            f"not a tensor. Pick a submodule that returns a tensor, or give an element "
            f"index, e.g. '{layer}:0'."
        )
    if not isinstance(output, Tensor):
        raise CdistillError(
            f"Layer {layer!r} returns {type(output).__name__}, not a tensor; pick a "
            "submodule that returns a tensor."
        )
    return output


def _check_finite(layer: str, value: Tensor) -> None:
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise CdistillError(
            f"Non-finite values (NaN/Inf) in the activation of layer {layer!r}: {bad} of "
            f"{value.numel()} entries. Check the inputs, the learning rate, or the "
            "layers before it."
        )


def _make_hook(
    store: ActivationStore,
    layer: str,
    index: int | None,
    detach: bool,
    grad_leaf: bool,
    check_finite: bool,
) -> Any:
    def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
        value = _select_output(layer, output, index)
        if check_finite:
            _check_finite(layer, value)
        if grad_leaf:
            # A fresh leaf substituted for the module's output: gradients w.r.t. the
            # activation exist even for a frozen model, and backprop stops here.
            leaf = value.detach().requires_grad_(True)
            store._set(layer, leaf)
            if index is None:
                return leaf
            replaced = list(output)
            replaced[index] = leaf
            if hasattr(output, "_fields"):  # a namedtuple takes its fields positionally
                return type(output)(*replaced)
            return type(output)(replaced) if isinstance(output, tuple) else replaced
        store._set(layer, value.detach() if detach else value)
        return None

    return hook


@contextmanager
def capture(
    model: nn.Module,
    layers: str | Sequence[str],
    *,
    detach: bool = False,
    check_finite: bool = False,
    grad_leaf: bool = False,
) -> Iterator[ActivationStore]:
    """Record the outputs of the named layers during forward passes inside the block.

    Example::

        with capture(model, "layer4") as acts:
            logits = model(x)
        a = acts["layer4"]  # [B, 512, 7, 7]

    Args:
        model: The model; layers are looked up in ``model.named_modules()``.
        layers: One layer spec or several; ``"path:i"`` picks element ``i`` of a module
            that returns a tuple or list.
        detach: Store detached outputs (no graph kept), e.g. for statistics.
        check_finite: Raise if a captured activation holds NaN or Inf (costs a device
            sync per layer call).
        grad_leaf: Replace the layer's output by a detached copy that requires grad, so
            ``torch.autograd.grad(f, acts[layer])`` works even when the model is frozen.
            Gradients do not flow to the layers before it.

    Yields:
        A mapping layer spec -> latest output tensor of that layer.

    Raises:
        CdistillError: A path is not a module path (close names are listed), or a
            module returns a tuple/list without an index.
    """
    specs = [layers] if isinstance(layers, str) else list(layers)
    # Resolve every path before registering anything, so a bad name leaves no hooks.
    modules = [(spec, resolve_module(model, spec), parse_layer(spec)[1]) for spec in specs]
    store = ActivationStore(specs)
    handles: list[RemovableHandle] = []
    try:
        for spec, module, index in modules:
            hook = _make_hook(store, spec, index, detach, grad_leaf, check_finite)
            handles.append(module.register_forward_hook(hook))
        yield store
    finally:
        for handle in handles:
            handle.remove()


class StopForward(Exception):
    """Raised by a hook to skip the rest of the network once a layer has run."""


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Skip the rest of the forward pass once ``module`` has run, inside the ``with`` body.

    Hooks registered on ``module`` before this one (a :func:`capture`, an eraser) still see its
    output; the body's forward call then returns early without an error.
    """

    def stop(mod: nn.Module, inputs: Any, output: Any) -> None:
        raise StopForward

    handle = module.register_forward_hook(stop)
    try:
        yield
    except StopForward:
        pass
    finally:
        handle.remove()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the ``with`` body, then restore each module's own mode.

    Restoring per module (not ``model.train(was)``) keeps a deliberately frozen submodule in
    eval mode; the modes come back also when the body raises.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def _model_device(model: nn.Module) -> torch.device | None:
    for param in model.parameters():
        return param.device
    for buffer in model.buffers():
        return buffer.device
    return None


@torch.no_grad()
def collect_activations(
    model: nn.Module,
    layer: str,
    batches: Iterable[Tensor | Sequence[Any]],
    *,
    flatten: bool = True,
    out_device: torch.device | str | None = None,
) -> Tensor:
    """Run ``model`` over ``batches`` in eval mode and stack one layer's activations.

    The model's train/eval mode is restored per module afterwards, so a deliberately
    frozen submodule stays in eval mode. The forward stops right after ``layer``.

    Args:
        model: The model.
        layer: Layer spec (see :func:`capture`).
        batches: Input tensors ``[B, ...]``, or tuples/lists whose first element is the
            input (as a DataLoader yields ``(x, y)``). Inputs are moved to the model's
            device.
        flatten: Return ``[N, d]`` (``d`` = product of the per-sample shape) instead of
            ``[N, *shape]``.
        out_device: Where to put the result (default: the activations' device).

    Returns:
        Activations ``[N, d]`` (or ``[N, *shape]`` if ``flatten=False``).

    Raises:
        CdistillError: Bad layer path, or no batches at all.
    """
    module = resolve_module(model, layer)
    device = _model_device(model)
    outputs: list[Tensor] = []
    with eval_mode(model), capture(model, layer, detach=True) as store:
        for batch in batches:
            x = batch if isinstance(batch, Tensor) else batch[0]
            if device is not None:
                x = x.to(device, non_blocking=True)
            with stop_after(module):  # registered after the capture hook, so it runs after it
                model(x)
            act = store[layer]
            act = act.reshape(act.shape[0], -1) if flatten else act
            outputs.append(act if out_device is None else act.to(out_device))
    if not outputs:
        raise CdistillError(f"No batches given to collect activations of layer {layer!r}.")
    return torch.cat(outputs)
