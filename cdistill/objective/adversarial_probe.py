"""An adversarial concept probe (docs/methods.md §2.12): a linear probe on a layer's
activations learns to tell a bias cue's values apart on the concept images, and the student
is trained to make it fail.

A term whose concept has one set per value (``color_{y}``: value ``k`` is the cue of class
``k``) gives a ``V``-way problem: which value is in this concept image? A CAV answers one such
question once, on the starting model; the probe keeps answering it on the current student, so
a cue the student re-encodes in another direction of the same layer is found again.

**Game, and why not a gradient-reversal layer.** Both parts run through the task's single
optimizer, each routed to its own parameters by detaching:

* the probe minimises its cross-entropy on the values, on *detached* activations (it trains
  only the probe);
* the student minimises ``KL(u || p)``, the divergence of the probe's prediction ``p`` from
  uniform, through the probe's *detached* weights (it trains only the student).

A gradient-reversal layer would instead have the student *maximise* the probe's cross-entropy,
which is unbounded and is best served by a probe that is confidently wrong: a permutation of the
values, i.e. a cue that is still there for the next layers to read. The uniform target is
bounded, and is 0 exactly when the probe, as it stands, cannot tell the values apart.

**Known limit.** Against a probe that learns a step at a time, the student can move the cue out
of the current probe's reach instead of removing it: the probe is fooled (its accuracy falls)
while a probe fitted afresh still reads the cue (the toy of tests/objective/test_adversarial_probe.py; the
same was reported for adversarial removal of attributes from text, Elazar and Goldberg 2018).

The probe reads the flattened map (the space a ``flatten`` CAV lives in). Its parameters are
one ``[ΣV, d]`` matrix and ``[ΣV]`` bias over all probed terms; ``d`` is known only once the
student's layer has run on an image of the data's size, so they start as ``[ΣV, 0]`` and take
their size from :meth:`ConceptProbe.resize` (before the optimizer is built) or from a state
dict being loaded. The probe is a submodule of the task, not of the student: checkpoints carry
it, ``student.pt`` does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cdistill.errors import CdistillError
from cdistill.objective.concept_images import ConceptImageSet
from cdistill.objective.concept_outputs import output_divergence, sample_rows
from cdistill.utils.capture import capture, resolve_module, stop_after


def probed_sets(sets: Sequence[ConceptImageSet]) -> list[ConceptImageSet]:
    """The sets a probe tells apart: desensitize terms whose concept has several values."""
    return [s for s in sets if not s.sensitize and len(s.values) > 1]


class ConceptProbe(nn.Module):
    """Linear probes, one block of rows per probed term (see the module docstring).

    Args:
        values: The number of cue values ``V_t`` of each probed term.
    """

    weight: nn.Parameter
    bias: nn.Parameter

    def __init__(self, values: Sequence[int]) -> None:
        super().__init__()
        if not values:
            raise CdistillError("model.lambda_adv > 0 needs a desensitize term whose concept has {y} "
                                "(one concept set per class, e.g. color_{y}): there is nothing to probe.")
        self.values = [int(v) for v in values]
        total = sum(self.values)
        self.weight = nn.Parameter(torch.zeros(total, 0))
        self.bias = nn.Parameter(torch.zeros(total))

    @property
    def dim(self) -> int:
        """Input dimension ``d`` (0: not sized yet)."""
        return int(self.weight.shape[1])

    def resize(self, dim: int) -> None:
        """Give the probe ``dim`` inputs (zero weights: uniform predictions). Call it before the
        optimizer is built: new parameters replace the old ones. A no-op at the right size."""
        if dim != self.dim:
            self.weight = nn.Parameter(self.weight.new_zeros(len(self.bias), dim))
            self.bias = nn.Parameter(self.bias.new_zeros(len(self.bias)))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        incoming = state_dict.get(prefix + "weight")
        if isinstance(incoming, Tensor) and incoming.ndim == 2 and incoming.shape[0] == len(self.bias):
            self.resize(int(incoming.shape[1]))  # an unsized probe receiving a saved one
        super()._load_from_state_dict(state_dict, prefix, *args)

    def blocks(self, feats: Tensor, *, detach_weights: bool = False) -> list[Tensor]:
        """The logits ``[N, V_t]`` of every term's probe for features ``[N, d]``."""
        if self.dim == 0:
            raise CdistillError("The adversarial probe is not sized yet: call prepare_probe(datamodule) "
                                "first (fit does, in setup).")
        w, b = (self.weight.detach(), self.bias.detach()) if detach_weights else (self.weight, self.bias)
        return list(F.linear(feats, w, b).split(self.values, dim=1))


@dataclass
class ProbeStep:
    """One step's probe figures: ``confusion`` (the student's term), ``fit`` (the probe's
    cross-entropy) and ``accuracy`` (the probe's, before this step's update)."""

    confusion: Tensor
    fit: Tensor
    accuracy: Tensor


def layer_features(forward: Callable[[Tensor], Tensor], model: nn.Module, layer: str, images: Tensor) -> Tensor:
    """``layer``'s flattened output ``[N, d]`` for ``images`` (the forward stops there; the
    graph to the student's parameters is kept)."""
    with capture(model, layer) as store, stop_after(resolve_module(model, layer)):
        forward(images)
    return store[layer].flatten(1)


def probe_step(
    probe: ConceptProbe, sets: Sequence[ConceptImageSet], features: Callable[[Tensor], Tensor],
    per_set: int, generator: torch.Generator | None, smoothing: float = 0.0,
) -> ProbeStep:
    """Draw ``per_set`` images of every value of every probed set and compute both parts of
    the game (see the module docstring), weighted by the terms' weights.

    Args:
        probe: The probe (sized).
        sets: The probed sets (:func:`probed_sets`), in the probe's block order.
        features: Images ``[N, C, H, W]`` -> the layer's features ``[N, d]`` (with graph).
        per_set: Images per value.
        generator: The task's generator (CPU): a resumed run draws the same images.
        smoothing: Label smoothing of the probe's cross-entropy.
    """
    drawn = [v[sample_rows(len(v), per_set, generator).to(v.device)] for s in sets for v in s.values]
    feats = features(torch.cat(drawn))
    sizes = [len(s.values) * per_set for s in sets]
    confusion = feats.new_zeros(())
    fit = feats.new_zeros(())
    correct, total = feats.new_zeros(()), 0
    own = probe.blocks(feats.detach())
    fooled = probe.blocks(feats, detach_weights=True)
    start = 0
    for s, n, logits, adv in zip(sets, sizes, own, fooled, strict=True):
        values = torch.arange(len(s.values), device=feats.device).repeat_interleave(per_set)
        rows = slice(start, start + n)
        start += n
        fit = fit + s.weight * F.cross_entropy(logits[rows], values, label_smoothing=smoothing)
        confusion = confusion + s.weight * output_divergence(adv[rows], "uniform")
        correct = correct + (logits[rows].detach().argmax(1) == values).sum()
        total += n
    return ProbeStep(confusion, fit, correct.float() / max(total, 1))


@torch.enable_grad()
def fit_probe(
    probe: ConceptProbe, feats: Sequence[Sequence[Tensor]], steps: int, lr: float, smoothing: float = 0.0
) -> float:
    """Fit the probe on fixed features before training: full-batch Adam on its cross-entropy.

    Args:
        probe: The probe (sized); its weights are overwritten in place (the optimizer's
            references stay valid).
        feats: Per probed term, per value ``k``: the features ``[N_k, d]`` of value ``k``'s
            images (detached).
        steps: Adam steps (0: nothing).
        lr: Adam learning rate.
        smoothing: Label smoothing of the cross-entropy.

    Returns:
        The probe's accuracy on those features afterwards (mean over terms).
    """
    w = probe.weight.detach().clone().requires_grad_(True)
    b = probe.bias.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([w, b], lr=lr)
    data = []
    start = 0
    for per_value in feats:
        x = torch.cat(list(per_value))
        labels = torch.cat([torch.full((len(v),), k, dtype=torch.long, device=x.device) for k, v in enumerate(per_value)])
        data.append((slice(start, start + len(per_value)), x, labels))
        start += len(per_value)

    def losses() -> tuple[Tensor, Tensor]:
        loss, acc = w.new_zeros(()), w.new_zeros(())
        for rows, x, labels in data:
            logits = x @ w[rows].T + b[rows]
            loss = loss + F.cross_entropy(logits, labels, label_smoothing=smoothing)
            acc = acc + (logits.detach().argmax(1) == labels).float().mean()
        return loss, acc / max(len(data), 1)

    for _ in range(steps):
        opt.zero_grad()
        losses()[0].backward()
        opt.step()
    with torch.no_grad():
        probe.weight.copy_(w)
        probe.bias.copy_(b)
        return float(losses()[1])
