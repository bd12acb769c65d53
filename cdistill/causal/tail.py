"""Replay only the part of a model after one layer, the *tail* (docs/methods.md §5).

Every energy evaluation of the causal basis (:mod:`cdistill.causal.basis`) ablates a direction
of one layer's output and needs the model's output on every input; the part of the network
before the layer does not depend on the direction. :func:`build_tail` traces the model with
:mod:`torch.fx` (the layer module is one more leaf besides the default ``torch.nn`` ones, so it
is a single ``call_module`` node) and cuts the graph there:

* the *tail* is the sub-graph of the nodes downstream of the layer node, a function of the
  layer's output and of the *frontier*: values computed before the layer that the tail still
  reads (a skip connection around the layer, the input itself). Parameters and buffers it
  reads stay attribute reads.
* the *head* computes the frontier from the model's inputs (the frontier's ancestors only, so
  never the layer itself); there is none when the frontier is empty (``layer4`` of a ResNet,
  a ViT block, a layer of a sequential CNN).

:class:`TailReplay` caches each batch's layer output (read by a forward hook during the
reference pass and cloned at once, before a later in-place op can change it) and frontier, and
then evaluates ``tail(replace_output(cached output), *frontier)`` with the ablation hook's own
:func:`~cdistill.causal.ablation.replace_output`, so both paths edit the activation identically.

The tail is unavailable (:class:`TailUnavailable`, with the reason) when the trace fails
(data-dependent Python control flow, untraceable code), when the layer is not exactly one
module call in the graph (called twice, hidden inside a leaf module), or when an in-place op
changes a value that another op reads afterwards across the cut (a data-flow slice would miss
the change). An in-place change through a *view* of a value is not detected here; the caller
compares the unpatched tail with the model's outputs on every batch before using it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, fx, nn

from cdistill.causal.ablation import Ablation, replace_output
from cdistill.errors import CdistillError
from cdistill.utils.capture import parse_layer, resolve_module

#: Python operators that change their first argument in place (``x += y``, ``x[i] = y``).
_INPLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift, operator.setitem,
})


class TailUnavailable(CdistillError):
    """The tail replay cannot stand in for the full forward at a layer.

    Attributes:
        layer: The layer spec.
        reason: Why, in a few words (for the log line of the fallback).
    """

    def __init__(self, layer: str, reason: str) -> None:
        super().__init__(
            f"Layer {layer!r}: the causal basis cannot replay only the part of the model after "
            f"the layer ({reason}). Pass tail=None to fall back to the full forward, or "
            "tail=False."
        )
        self.layer = layer
        self.reason = reason


class _Tracer(fx.Tracer):
    """The default tracer, with the layer module as one more leaf (one ``call_module`` node)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is self.layer or super().is_leaf_module(m, module_qualified_name)


def _is_inplace_name(name: str) -> bool:
    return name.endswith("_") and not name.startswith("__")


def _mutated(node: fx.Node, root: nn.Module) -> list[fx.Node]:
    """The nodes whose values ``node`` changes in place (first argument, ``out=``)."""
    changed = [out for out in (node.kwargs.get("out"),) if isinstance(out, fx.Node)]
    first = node.args[0] if node.args else None
    if not isinstance(first, fx.Node):
        return changed
    if node.op == "call_method":
        inplace = _is_inplace_name(str(node.target))
    elif node.op == "call_function":
        inplace = node.target in _INPLACE_OPERATORS or _is_inplace_name(
            getattr(node.target, "__name__", "")
        )
    elif node.op == "call_module":
        inplace = getattr(root.get_submodule(str(node.target)), "inplace", False) is True
    else:
        inplace = False
    if inplace or node.kwargs.get("inplace") is True:
        changed.append(first)
    return changed


def _crossing_mutation(graph: fx.Graph, root: nn.Module, down: set[fx.Node]) -> str | None:
    """Why an in-place op breaks the cut, or ``None`` when none does.

    Such an op is harmless when no other op reads the value after it (``out += identity``,
    ``relu(inplace=True)`` on a fresh value), or when the op and all those later readers run in
    the tail (which replays them in order, on clones of the cached values).
    """
    position = {n: i for i, n in enumerate(graph.nodes)}
    for node in graph.nodes:
        for value in _mutated(node, root):
            later = [u for u in value.users if u is not node and position[u] > position[node]]
            if later and not (node in down and all(u in down for u in later)):
                return (
                    f"the in-place op {node.name!r} changes {value.name!r}, which "
                    f"{later[0].name!r} reads afterwards"
                )
    return None


def _reach(starts: list[fx.Node], neighbours: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    """Every node reached from ``starts`` by following ``neighbours`` (``starts`` excluded unless reached)."""
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        for nxt in neighbours(stack.pop()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def _downstream(start: fx.Node) -> set[fx.Node]:
    """Every node that depends on ``start`` (``start`` itself excluded)."""
    return _reach([start], lambda n: n.users)


def _upstream(targets: list[fx.Node]) -> set[fx.Node]:
    """``targets`` and every node they depend on."""
    return set(targets) | _reach(targets, lambda n: n.all_input_nodes)


def _cut(graph: fx.Graph, layer_node: fx.Node, down: set[fx.Node]) -> tuple[fx.Graph, fx.Graph | None, list[fx.Node]]:
    """The tail graph ``(layer_out, *frontier) -> output``, the head graph ``inputs -> frontier``
    (``None`` for an empty frontier) and the frontier nodes of ``graph``."""
    kept = [n for n in graph.nodes if n in down or n.op == "output"]
    frontier: list[fx.Node] = []
    for node in kept:
        for arg in node.all_input_nodes:
            if arg is not layer_node and arg not in down and arg.op != "get_attr" and arg not in frontier:
                frontier.append(arg)
    tail = fx.Graph()
    env: dict[fx.Node, fx.Node] = {layer_node: tail.placeholder("layer_out")}
    for i, node in enumerate(frontier):
        env[node] = tail.placeholder(f"frontier_{i}")
    for node in graph.nodes:
        reads_attr = node.op == "get_attr" and any(u in down or u.op == "output" for u in node.users)
        if node in down or node.op == "output" or reads_attr:
            env[node] = tail.node_copy(node, lambda a: env[a])
    if not frontier:
        return tail, None, frontier
    head = fx.Graph()
    needed = _upstream(frontier)
    head_env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "placeholder" or node in needed:  # every input, to keep the call signature
            head_env[node] = head.node_copy(node, lambda a: head_env[a])
    head.output(tuple(head_env[n] for n in frontier))
    return tail, head, frontier


def _cloned(value: Any) -> Any:
    """``value`` with its tensors (itself, or the elements of a tuple or list) detached and cloned."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, (tuple, list)):
        items = [_cloned(v) for v in value]
        if hasattr(value, "_fields"):  # a namedtuple takes its fields positionally
            return type(value)(*items)
        return type(value)(items)
    return value


class TailReplay:
    """The tail of one layer and, per batch, the values it reads.

    Memory: from the reference pass until :meth:`release`, every batch's layer output and
    frontier stay on the model's device, ``N x (layer output + frontier)`` elements in the
    model's dtype for ``N`` inputs (ResNet-18 ``layer4`` at 64 px: 512 x 2 x 2 floats, 8 KiB
    per input, 8 MB for 1,000; ``layer1`` at 224 px: 800 MB). The frontier is empty for a
    layer on a sequential path (a ResNet stage or block, a ViT block).

    Attributes:
        layer: The layer spec.
        frontier: Names of the graph nodes the tail reads besides the layer's output.
    """

    def __init__(
        self,
        layer: str,
        module: nn.Module,
        tail: fx.GraphModule,
        head: fx.GraphModule | None,
        frontier: list[str],
    ) -> None:
        self.layer = layer
        self.index = parse_layer(layer)[1]
        self.module = module
        self.tail = tail
        self.head = head
        self.frontier = tuple(frontier)
        self._outputs: list[Any] = []
        self._frontier: list[tuple[Any, ...]] = []
        self._pending: Any = None

    @property
    def batches(self) -> int:
        return len(self._outputs)

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Inside the block, every forward of the model leaves the layer's output for :meth:`record`."""

        def hook(mod: nn.Module, inputs: Any, output: Any) -> None:
            self._pending = _cloned(output)  # now: a later in-place op may overwrite it

        handle = self.module.register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def record(self, x: Tensor | None) -> None:
        """Keep what the tail needs of the batch ``x`` the model has just run (``None``: an
        empty batch, kept as a placeholder so that the batch indices stay aligned)."""
        output, self._pending = self._pending, None
        self._outputs.append(output if x is not None else None)
        self._frontier.append(tuple(self.head(x)) if x is not None and self.head is not None else ())

    def recorded(self, b: int) -> bool:
        """Whether batch ``b`` ran the layer (``False`` for a placeholder)."""
        return self._outputs[b] is not None

    def __call__(self, b: int, ablation: Ablation) -> Any:
        """The model's output on batch ``b`` with ``ablation`` applied to the layer's output.

        Cached tensors are cloned where the tail could change them in place (the frontier;
        the layer output unless the ablation makes a new tensor of it), so every call starts
        from the values of the reference pass.
        """
        cached = self._outputs[b]
        if self.index is not None or ablation.direction is None:
            cached = _cloned(cached)
        output = replace_output(self.layer, cached, self.index, ablation)
        return self.tail(output, *_cloned(self._frontier[b]))

    def unpatched(self, b: int) -> Any:
        """The tail's output on batch ``b`` with the layer's output unchanged."""
        return self.tail(_cloned(self._outputs[b]), *_cloned(self._frontier[b]))

    def release(self) -> None:
        """Drop the cached values."""
        self._outputs, self._frontier, self._pending = [], [], None


def build_tail(model: nn.Module, layer: str) -> TailReplay:
    """Trace ``model`` and cut it after ``layer`` (see the module docstring).

    Tracing runs the model's ``forward`` once on symbolic values (Python side effects in it
    happen once); call it with the model in the mode it will run in (its ``self.training``
    branches are fixed by the trace).

    Args:
        model: The model (called as ``model(x)``).
        layer: Module path, optionally ``"path:i"`` for element ``i`` of a tuple output.

    Returns:
        The replay, with nothing cached yet.

    Raises:
        CdistillError: ``layer`` is not a module path.
        TailUnavailable: The model cannot be traced, the layer is not one module call in the
            graph, or an in-place op crosses the cut.
    """
    module = resolve_module(model, layer)
    try:
        graph = _Tracer(module).trace(model)
    except Exception as err:  # any failure of the trace means: no tail, for whatever reason
        first = (str(err).strip().splitlines() or [""])[0][:200]
        raise TailUnavailable(
            layer, f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {first}"
        ) from err
    calls = [
        n for n in graph.nodes if n.op == "call_module" and model.get_submodule(str(n.target)) is module
    ]
    if len(calls) != 1:
        where = f"is called {len(calls)} times" if calls else "is not called as a module"
        raise TailUnavailable(
            layer, f"in the traced graph the layer {where} (one call is needed; a layer inside "
            "a torch.nn leaf module is not traced into)"
        )
    down = _downstream(calls[0])
    crossing = _crossing_mutation(graph, model, down)
    if crossing is not None:
        raise TailUnavailable(layer, crossing)
    tail, head, frontier = _cut(graph, calls[0], down)
    return TailReplay(
        layer,
        module,
        fx.GraphModule(model, tail),
        fx.GraphModule(model, head) if head is not None else None,
        [n.name for n in frontier],
    )
