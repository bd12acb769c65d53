"""The ``reliance`` measure of ``cdistill-measure``: does the student rely on the bias concept?

The bias concept is the ``{y}`` term of ``model.concepts.terms`` (e.g. ``color_{y}`` vs
``grey``), one *value* per class ``k`` it acts on (the concept set ``color_k``). At the
measured layer one CAV is fitted per value, as training fits them (solver, held-out share,
row mode); their span is the bias subspace. Then (:mod:`cdistill.causal.reliance`):

- ``reliance/ablation_kl`` / ``reliance/ablation_kl_random``: mean KL of the student's output
  when the bias subspace / a random one of the same rank is mean-ablated, on ``split``;
- ``reliance/acc_drop`` (and ``_conflicting`` / ``_aligned`` where ``split`` has such inputs,
  ``_random`` for the control): accuracy lost by that ablation;
- ``reliance/concept_agreement`` (``_lo`` / ``_hi``: Wilson 95%), ``reliance/chance``: how often
  the concept images of value ``k`` alone are classified as ``k``;
- ``reliance/causal_share_in_bias``: the energy share of the layer's top causal directions
  (:func:`cdistill.causal.extract_causal_bases`, ``k`` of them) inside the bias subspace;
- ``reliance/rank``: dimension of the bias subspace.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Subset

from cdistill.causal import (
    causal_alignment,
    concept_ablation,
    concept_only_agreement,
    extract_causal_bases,
)
from cdistill.concepts import load_spec, preprocess
from cdistill.concepts.cav import fit_cav
from cdistill.concepts.check import layer_rows
from cdistill.concepts.layer_choice import MAX_IMAGES
from cdistill.errors import CdistillError
from cdistill.objective.cav_fitter import negative_rows
from cdistill.objective.config import ConceptsConfig, ConceptTerm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BiasSubspace:
    """The bias concept at one layer.

    Attributes:
        vectors: ``[d, r]`` one CAV per concept value (columns), in ``space``.
        space: ``flatten`` or ``position`` (the CAV row mode, which is the ablation's space).
        images: Per value, its preprocessed concept images ``[N_j, C, H, W]``.
        classes: The class each value points to.
        accuracies: Held-out accuracy of each value's CAV.
    """

    vectors: Tensor
    space: str
    images: list[Tensor]
    classes: list[int]
    accuracies: list[float]


def bias_term(concepts: ConceptsConfig) -> ConceptTerm:
    """The first term whose concept has ``{y}`` (one concept set per class).

    Raises:
        CdistillError: No such term.
    """
    for term in concepts.terms:
        if "{y}" in term.concept:
            return term
    raise CdistillError(
        "The reliance measure needs a class-indexed bias term in model.concepts.terms (a concept with "
        f"'{{y}}', e.g. color_{{y}}); the terms are {[t.concept for t in concepts.terms]}. Add one, or drop "
        "reliance from measure.measures."
    )


def bias_subspace(model: nn.Module, datamodule: Any, concepts: ConceptsConfig, layer: str,
                  num_classes: int) -> BiasSubspace:
    """Fit one CAV per value of the bias term at ``layer`` (see the module docstring).

    The spec's sets are loaded at the data's size and channels and normalised by the
    datamodule (the first :data:`~cdistill.concepts.layer_choice.MAX_IMAGES` of each, in the
    spec's order, as the layer choice does); the global random state is left as it was.

    Raises:
        CdistillError: No spec, no ``{y}`` term, or a value's set missing from the spec.
    """
    if not concepts.spec:
        raise CdistillError("The reliance measure needs the concept spec (model.concepts.spec).")
    term = bias_term(concepts)
    classes = list(term.classes) if term.classes is not None else list(range(num_classes))
    kw = {"channels": datamodule.num_channels, "size": datamodule.image_size}
    with torch.random.fork_rng(devices=[]):
        sets = load_spec(concepts.spec, **kw)
        inputs = {name: preprocess(x[:MAX_IMAGES], datamodule.normalize, **kw) for name, x in sets.items()}
        blank = preprocess(torch.zeros_like(next(iter(sets.values()))[:1]), datamodule.normalize, **kw)
    names = [term.concept.format(y=k) for k in classes]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise CdistillError(f"The bias term needs concept sets {missing}, which the spec {concepts.spec!r} lacks; "
                            f"it has {sorted(inputs)}. Add them (a for_k entry) or fix the term.")
    cav = concepts.cav
    rows = layer_rows(model, inputs, [layer], cav, blank=blank)[layer]
    vectors, accuracies = [], []
    for name in names:
        res = fit_cav(rows[name], negative_rows(rows, term.negative), cav.solver, test_fraction=float(cav.test_fraction),
                      seed=0, concept=name, negative=term.negative, layer=layer)
        vectors.append(res.vector.double())
        accuracies.append(float(res.accuracy))
    low = [f"{n} ({a:.2f})" for n, a in zip(names, accuracies, strict=True) if a < float(cav.min_accuracy)]
    if low:  # the subspace still means something; training would have skipped these CAVs
        log.warning("reliance: CAVs under the gate (%s) at %s: %s", cav.min_accuracy, layer, ", ".join(low))
    space = "position" if cav.cav_mode == "position" else "flatten"
    return BiasSubspace(torch.stack(vectors, 1), space, [inputs[n] for n in names], classes, accuracies)


def reliance_metrics(model: nn.Module, datamodule: Any, concepts: ConceptsConfig, layer: str, num_classes: int,
                     settings: Mapping[str, Any]) -> dict[str, float]:
    """The ``reliance/*`` metrics of the module docstring.

    Args:
        model: The student (eval mode, on its device).
        datamodule: Set up; gives ``split(name)``, ``normalize``, size and channels.
        concepts: ``model.concepts`` (spec, terms, CAV settings).
        layer: The measured layer (already resolved).
        num_classes: Classes of the task.
        settings: ``measure.reliance``: ``split`` (a name or a list, concatenated), ``max_inputs``, ``mode``, ``k`` (``null``:
            rank + 2; 0: no causal share), ``causal_inputs``, ``max_iter``, ``seed``.
    """
    bias = bias_subspace(model, datamodule, concepts, layer, num_classes)
    names = settings["split"]
    names = [str(names)] if isinstance(names, str) else [str(n) for n in names]
    # Several splits: a biased one gives the aligned inputs, a shifted one the conflicting.
    data: ConcatDataset[Any] = ConcatDataset([datamodule.split(n) for n in names])
    gen = torch.Generator().manual_seed(int(settings["seed"]))
    # A seeded subset, not the first inputs: a split may be ordered by class or group.
    order = torch.randperm(len(data), generator=gen)[: int(settings["max_inputs"])].sort().values.tolist()
    subset = Subset(data, order)
    abl = concept_ablation(model, layer, bias.vectors, subset, space=bias.space, mode=str(settings["mode"]),
                           control_seed=int(settings["seed"]))
    out = {
        "reliance/rank": float(abl.rank),
        "reliance/ablation_kl": abl.concept["all"].kl,
        "reliance/ablation_kl_random": abl.control["all"].kl,
        "reliance/acc_drop": abl.concept["all"].acc_drop,
        "reliance/acc_drop_random": abl.control["all"].acc_drop,
    }
    for group in ("conflicting", "aligned"):
        if group in abl.concept and abl.concept[group].n > 0:  # e.g. a shifted test split has no aligned inputs
            out[f"reliance/acc_drop_{group}"] = abl.concept[group].acc_drop
    agree = concept_only_agreement(model, bias.images, bias.classes)
    out |= {"reliance/concept_agreement": agree.rate, "reliance/concept_agreement_lo": agree.lo,
            "reliance/concept_agreement_hi": agree.hi, "reliance/chance": agree.chance}
    k = settings.get("k")
    k = abl.rank + 2 if k is None else int(k)
    if k > 0:
        n = min(int(settings["causal_inputs"]), len(subset))
        loader = DataLoader(Subset(subset, list(range(n))), batch_size=256, shuffle=False)
        dim = bias.vectors.shape[0]
        basis = extract_causal_bases(model, layer, loader, min(k, dim), mode=str(settings["mode"]), space=bias.space,
                                     max_iter=int(settings["max_iter"]), seed=int(settings["seed"]))[layer]
        out["reliance/causal_share_in_bias"] = causal_alignment(basis.basis, bias.vectors, basis.energies).share
    return out
