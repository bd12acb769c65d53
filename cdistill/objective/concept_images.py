"""The concept-image terms of the distill task: concept-only predictions (docs/methods.md §2.8)
and latent counterfactuals (§2.9), computed from one forward pass of sampled concept images.

The concept images are the ones the CAVs are fitted on (the task's concept spec); here they act
on the model's outputs, through the whole network, instead of through a direction at one layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdistill.concepts import load_spec, preprocess
from cdistill.errors import CdistillError
from cdistill.objective import counterfactual as cf
from cdistill.objective.concept_outputs import output_divergence, sample_rows
from cdistill.objective.config import ConceptTerm, OutputConfig
from cdistill.utils.capture import capture, resolve_module, stop_after

#: The layer name of the image itself (a student without an ``input`` module is shifted in pixels).
INPUT = "input"


@dataclass
class ConceptImageSet:
    """The concept images of one concept term, preprocessed, on the model's device.

    Attributes:
        values: One ``[N_k, C, H, W]`` set per cue value (``color_0`` .. ``color_9``); one set
            for a term without ``{y}``.
        classes: The class each value's cue points to (the ``{y}`` it was expanded with).
        negatives: ``[N', C, H, W]`` images of the term's negative set (all of a split pool).
        sensitize: The term's direction is ``sensitize``.
        weight: The term's weight.
    """

    values: list[Tensor]
    classes: list[int]
    negatives: Tensor
    sensitize: bool
    weight: float


def load_image_sets(
    spec: str, terms: Sequence[ConceptTerm], num_classes: int, normalize: Callable[[Tensor], Tensor],
    channels: int, size: int, device: torch.device | str, paired: bool = False,
) -> tuple[list[ConceptImageSet], Tensor]:
    """The :class:`ConceptImageSet` of every term and a blank (black) image ``[1, C, H, W]``,
    both with the student's preprocessing (``paired``: the spec's generated sets drawn from one
    shared stream, :func:`~cdistill.concepts.sets.load_spec`)."""
    images = load_spec(spec, channels=channels, size=size, paired=paired)

    def named(name: str) -> Tensor:
        base = name.rstrip("/")
        pool = [v for k, v in images.items() if k.startswith(base + "/")]
        found = images.get(base)
        if found is None and not pool:
            raise CdistillError(f"Concept set {name!r} is not in {spec}; fix the term or the spec "
                                f"(sets: {sorted(images)[:12]}).")
        x = found if found is not None else torch.cat(pool)
        return preprocess(x, normalize, channels=channels, size=size).to(device)

    sets = []
    for term in terms:
        if "{y}" in term.concept:
            classes = list(term.classes if term.classes is not None else range(num_classes))
            values = [named(term.concept.format(y=k)) for k in classes]
        else:  # one set; a sensitize term points it to its (first) class
            classes, values = list(term.classes or (0,))[:1], [named(term.concept)]
        sets.append(ConceptImageSet(values, classes, named(term.negative), term.direction == "sensitize",
                                    float(term.weight)))
    blank = normalize(torch.zeros(1, channels, size, size)).to(device)
    return sets, blank


def _is_pixels(model: nn.Module, layer: str) -> bool:
    """``layer`` is the image itself: ``input`` on a model without such a module."""
    return layer == INPUT and INPUT not in dict(model.named_modules())


def _shifted_forward(model: nn.Module, forward: Callable[[Tensor], Tensor], layer: str, x: Tensor,
                     fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``forward(x)`` with ``layer``'s output ``a`` replaced by ``fn(a)`` (the pixels themselves,
    see :func:`_is_pixels`)."""
    if _is_pixels(model, layer):
        return forward(fn(x))
    with cf.mapped(resolve_module(model, layer), fn):
        return forward(x)


def _counterfactual_map(mode: str, means: Tensor, own: Tensor, other: Tensor, keep: Tensor,
                        acts: Tensor | None, blank: Tensor) -> Callable[[Tensor], Tensor]:
    """The map that moves a batch's layer output from each sample's own cue value to ``other``.

    Args:
        mode: The layer's :data:`~cdistill.objective.counterfactual.SHIFT_MODES` entry.
        means: The values' concept statistics (:func:`~cdistill.objective.counterfactual.value_means`).
        own, other: ``[B]`` value indices; keep: ``[B]`` samples the term acts on (others pass).
        acts: ``[B, C, H, W]`` the batch's detached layer output (where position modes act).
        blank: A blank image's output at the layer.

    Returns:
        ``fn(a) -> a'`` on the live (differentiable) output.
    """
    if mode == "transport":
        if acts is None:
            raise ValueError("transport-mode counterfactuals need the samples' activations")
        matrices, offsets = cf.transport(means, own, other)
        mask = cf.foreground(acts, blank) * keep.view(-1, 1, 1, 1).to(acts.dtype)  # [B, 1, H, W]
        return lambda a: a + mask * (torch.einsum("bcd,bdhw->bchw", matrices, a)
                                     + offsets[:, :, None, None] - a)
    if mode == "moments":
        if acts is None:
            raise ValueError("moments-mode counterfactuals need the samples' activations")
        scale, delta = cf.affine(means, own, other, acts, blank)
        kept = keep.view(-1, 1, 1, 1).to(acts.dtype)
        scale, delta = 1 + (scale - 1) * kept, delta * kept
        return lambda a: a * scale + delta
    delta = cf.shift(means, own, other, mode, acts, blank)
    delta = delta * keep.view(-1, *[1] * (delta.dim() - 1)).to(delta.dtype)
    return lambda a: a + delta


class ConceptImageTerms:
    """Samples concept images each step and computes the two terms.

    Args:
        sets: One :class:`ConceptImageSet` per concept term.
        blank: ``[1, C, H, W]`` blank image (position-mode foregrounds).
        cfg: Sampling and the output target.
        layers: Layers of the counterfactual term (empty: no counterfactual term).
    """

    def __init__(self, sets: list[ConceptImageSet], blank: Tensor, cfg: OutputConfig,
                 layers: Sequence[cf.ShiftLayer]) -> None:
        self.sets, self.blank, self.cfg, self.layers = sets, blank, cfg, list(layers)
        #: The desensitized terms whose cue has several values: the counterfactual moves between them.
        self.shiftable = [s for s in sets if not s.sensitize and len(s.values) > 1]
        if self.layers and not self.shiftable:
            raise CdistillError("model.lambda_s > 0 needs a desensitize term whose concept has {y} "
                                "(one concept set per class, e.g. color_{y}): there is none to move between.")

    def __call__(self, model: nn.Module, forward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor,
                 generator: torch.Generator | None, counterfactual: bool = True) -> dict[str, Tensor]:
        """``output`` (concept-only predictions) and, with ``counterfactual``, ``counterfactual``.

        Args:
            model: The student (its layers are hooked).
            forward: The task's forward (erasers included), images -> logits ``[B, C]``.
            x: ``[B, C, H, W]`` training images; y: ``[B]`` their labels.
            generator: The task's generator (CPU), for the draws.
            counterfactual: Also compute the counterfactual term.
        """
        batches = []
        for s in self.sets:
            group = (*s.values, s.negatives)
            if self.cfg.target == "paired":  # the same rows of every version: image i is one shape
                rows = sample_rows(min(len(g) for g in group), self.cfg.per_set, generator).to(x.device)
                batches += [g[rows] for g in group]
            else:
                batches += [g[sample_rows(len(g), self.cfg.per_set, generator).to(x.device)] for g in group]
        sizes = [len(b) for b in batches] + [1]
        layers = [sl.layer for sl in self.layers] if counterfactual else []
        module_layers = [name for name in layers if not _is_pixels(model, name)]
        images = torch.cat([*batches, self.blank])
        with capture(model, module_layers, detach=True) as store:
            logits = forward(images).split(sizes)
        acts = {name: images if _is_pixels(model, name) else store[name] for name in layers}
        out = {"output": self._output(logits)}
        if counterfactual and self.layers:
            out["counterfactual"] = self._counterfactual(model, forward, x, y, generator,
                                                         {k: v.detach().split(sizes) for k, v in acts.items()})
        return out

    def _output(self, logits: Sequence[Tensor]) -> Tensor:
        total, i = logits[0].new_zeros(()), 0
        for s in self.sets:
            n = len(s.values)
            concept, negative = torch.cat(list(logits[i : i + n])), logits[i + n]
            i += n + 1
            if s.sensitize:  # the concept alone should predict its class
                labels = torch.tensor(s.classes, device=concept.device).repeat_interleave(self.cfg.per_set)
                total = total + s.weight * F.cross_entropy(concept, labels)
            else:
                sets = n if self.cfg.reduce == "set" else 0
                total = total + s.weight * output_divergence(concept, self.cfg.target, negative, sets=sets)
        return total

    def _counterfactual(self, model: nn.Module, forward: Callable[[Tensor], Tensor], x: Tensor, y: Tensor,
                        generator: torch.Generator | None, acts: dict[str, Sequence[Tensor]]) -> Tensor:
        """Sum over layers (mean over shiftable terms) of the cross-entropy of the shifted training batch."""
        starts, i = {}, 0
        for s in self.sets:
            starts[id(s)] = i
            i += len(s.values) + 1
        # Where each position-mode shift lands: the training batch's own map at that layer.
        here = {sl.layer: self._layer_acts(model, forward, sl.layer, x) for sl in self.layers if sl.mode != "flatten"}
        total, terms = x.new_zeros(()), 0
        for s in self.shiftable:
            classes = torch.tensor(s.classes, device=y.device)
            match = y[:, None] == classes[None]  # [B, V]
            keep = match.any(1)  # samples of a class the term acts on
            if not bool(keep.any()):
                continue
            terms += 1
            own = match.float().argmax(1)
            # another value, uniformly among the V - 1 others
            step = torch.randint(1, len(classes), y.shape, generator=generator).to(y.device)
            other = (own + step) % len(classes)
            for sl in self.layers:
                chunks = acts[sl.layer]
                blank = chunks[-1]
                means = cf.value_means(chunks[starts[id(s)] : starts[id(s)] + len(s.values)], blank, sl.mode)
                logits = _shifted_forward(model, forward, sl.layer, x,
                                          _counterfactual_map(sl.mode, means, own, other, keep, here.get(sl.layer), blank))
                total = total + F.cross_entropy(logits[keep], y[keep])
        # A sum over layers: each layer's counterfactual is a separate constraint of weight λ_s.
        return total / max(terms, 1)

    @staticmethod
    @torch.no_grad()
    def _layer_acts(model: nn.Module, forward: Callable[[Tensor], Tensor], layer: str, x: Tensor) -> Tensor:
        """``layer``'s output for ``x`` (where a position-mode shift lands); the forward stops there."""
        if _is_pixels(model, layer):
            return x
        # stop_after registers after the capture hook, so the capture sees the output first.
        with capture(model, layer, detach=True) as store, stop_after(resolve_module(model, layer)):
            forward(x)
        return store[layer]
