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

The bias subspace is the span of those CAVs by default (``measure.reliance.subspace=cavs``); with
``leace`` it is the subspace a LEACE eraser of the bias edits, fitted on labelled inputs
(:mod:`cdistill.causal.bias_span`), and the ablation and the causal share use it instead.

:func:`reliance_report` also returns what the plots (:mod:`cdistill.cli.reliance_plots`) need
beyond these scalars: the agreement per concept value and the causal energy spectrum with each
direction's share inside the bias subspace (:class:`RelianceDetail`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, DataLoader, Subset

from cdistill.causal import (
    Agreement,
    causal_alignment,
    concept_ablation,
    concept_only_agreement,
    extract_causal_bases,
    wilson_interval,
)
from cdistill.causal.bias_span import bias_leace_span
from cdistill.concepts import load_spec, preprocess
from cdistill.concepts.cav import fit_cav
from cdistill.concepts.check import layer_rows
from cdistill.concepts.layer_choice import MAX_IMAGES
from cdistill.errors import CdistillError, unknown_name
from cdistill.objective.cav_fitter import negative_rows
from cdistill.objective.config import CAVConfig, ConceptsConfig, ConceptTerm
from cdistill.utils.datamodule import ImageData

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


@dataclass(frozen=True)
class BiasImages:
    """The concept images of the bias term, as the task sees them.

    Attributes:
        term: The bias term (:func:`bias_term`).
        names: The term's concept set per value (e.g. ``color_3``).
        classes: The class each value points to.
        inputs: Every set of the spec -> preprocessed images ``[N, C, H, W]`` (negatives too).
        blank: ``position`` mode's preprocessed blank image ``[1, C, H, W]``.
    """

    term: ConceptTerm
    names: list[str]
    classes: list[int]
    inputs: dict[str, Tensor]
    blank: Tensor


def bias_images(datamodule: ImageData, concepts: ConceptsConfig, num_classes: int,
                max_images: int | None = None) -> BiasImages:
    """Load the spec's sets at the data's size and channels, normalised by the datamodule (the
    first ``max_images`` of each, default :data:`~cdistill.concepts.layer_choice.MAX_IMAGES`, in
    the spec's order, as the layer choice does); the global random state is left as it was.

    Raises:
        CdistillError: No spec, no ``{y}`` term, or a value's set missing from the spec.
    """
    if not concepts.spec:
        raise CdistillError("The reliance measure needs the concept spec (model.concepts.spec).")
    term = bias_term(concepts)
    classes = list(term.classes) if term.classes is not None else list(range(num_classes))
    kw: dict[str, Any] = {"channels": datamodule.num_channels, "size": datamodule.image_size}
    with torch.random.fork_rng(devices=[]):
        sets = load_spec(concepts.spec, **kw)
        cap = MAX_IMAGES if max_images is None else int(max_images)
        inputs = {name: preprocess(x[:cap], datamodule.normalize, **kw) for name, x in sets.items()}
        blank = preprocess(torch.zeros_like(next(iter(sets.values()))[:1]), datamodule.normalize, **kw)
    names = [term.concept.format(y=k) for k in classes]
    missing = [n for n in names if n not in inputs]
    if missing:
        raise CdistillError(f"The bias term needs concept sets {missing}, which the spec {concepts.spec!r} lacks; "
                            f"it has {sorted(inputs)}. Add them (a for_k entry) or fix the term.")
    return BiasImages(term, names, classes, inputs, blank)


def fit_bias_subspace(rows: Mapping[str, Tensor], images: BiasImages, cav: CAVConfig, layer: str) -> BiasSubspace:
    """One CAV per value of the bias term from its rows at ``layer`` (set name -> CAV rows,
    :func:`~cdistill.concepts.check.layer_rows`), fitted as training fits them.

    Raises:
        CdistillError: A CAV cannot be fitted (e.g. every row the same).
    """
    vectors, accuracies = [], []
    for name in images.names:
        res = fit_cav(rows[name], negative_rows(rows, images.term.negative), cav.solver,
                      test_fraction=float(cav.test_fraction), seed=0, concept=name, negative=images.term.negative,
                      layer=layer)
        vectors.append(res.vector.double())
        accuracies.append(float(res.accuracy))
    low = [f"{n} ({a:.2f})" for n, a in zip(images.names, accuracies, strict=True) if a < float(cav.min_accuracy)]
    if low:  # the subspace still means something; training would have skipped these CAVs
        log.warning("reliance: CAVs under the gate (%s) at %s: %s", cav.min_accuracy, layer, ", ".join(low))
    return BiasSubspace(torch.stack(vectors, 1), cav_space(cav), [images.inputs[n] for n in images.names],
                        images.classes, accuracies)


def cav_space(cav: CAVConfig) -> str:
    """The ablation space of CAVs fitted in ``cav``'s row mode (``position`` or ``flatten``)."""
    return "position" if cav.cav_mode == "position" else "flatten"


def bias_subspace(model: nn.Module, datamodule: ImageData, concepts: ConceptsConfig, layer: str,
                  num_classes: int, max_images: int | None = None) -> BiasSubspace:
    """Fit one CAV per value of the bias term at ``layer`` (see the module docstring):
    :func:`bias_images`, then :func:`fit_bias_subspace` on their rows there."""
    images = bias_images(datamodule, concepts, num_classes, max_images)
    rows = layer_rows(model, images.inputs, [layer], concepts.cav, blank=images.blank)[layer]
    return fit_bias_subspace(rows, images, concepts.cav, layer)


def measure_subset(datamodule: ImageData, settings: Mapping[str, Any]) -> Subset[Any]:
    """The inputs the ablation is measured on: a seeded subset (``settings["seed"]``) of at most
    ``max_inputs`` of the ``split`` splits together (a biased split gives the aligned inputs, a
    shifted one the conflicting), in their order."""
    names = settings["split"]
    names = [str(names)] if isinstance(names, str) else [str(n) for n in names]
    data: ConcatDataset[Any] = ConcatDataset([datamodule.split(n) for n in names])
    gen = torch.Generator().manual_seed(int(settings["seed"]))
    # A seeded subset, not the first inputs: a split may be ordered by class or group.
    order = torch.randperm(len(data), generator=gen)[: int(settings["max_inputs"])].sort().values.tolist()
    return Subset(data, order)


@dataclass(frozen=True)
class RelianceDetail:
    """What :func:`reliance_report` measured beyond the flat metrics (JSON-friendly).

    Attributes:
        values: The bias term's concept set per value (e.g. ``color_3``).
        classes: The class each value points to.
        agreement: Per value, the concept-only :class:`~cdistill.causal.Agreement` (its images
            alone, Wilson 95% interval, chance ``1/K``).
        energies: ``[k']`` energies (mean KL, nats) of the layer's top causal directions,
            descending; empty when the causal share was skipped (``k = 0``).
        shares: ``[k']`` share ``||P v_i||²`` of each causal direction inside the bias subspace.
        random_share: ``r / d``, the expected share of a uniformly random direction (the bias
            subspace's rank over the layer's row size): the shares' reference level.
    """

    values: list[str]
    classes: list[int]
    agreement: list[Agreement]
    energies: list[float] = field(default_factory=list)
    shares: list[float] = field(default_factory=list)
    random_share: float | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RelianceDetail:
        """The inverse of :func:`dataclasses.asdict` (e.g. read back from ``pipeline.json``)."""
        return cls([str(v) for v in d["values"]], [int(k) for k in d["classes"]],
                   [Agreement(**a) for a in d["agreement"]], [float(e) for e in d.get("energies", [])],
                   [float(x) for x in d.get("shares", [])], d.get("random_share"))


@dataclass(frozen=True)
class Reliance:
    """Result of :func:`reliance_report`.

    Attributes:
        metrics: The flat ``reliance/*`` metrics of the module docstring.
        detail: Per concept value and per causal direction (the plots).
    """

    metrics: dict[str, float]
    detail: RelianceDetail


def pooled_agreement(parts: list[Agreement]) -> Agreement:
    """One :class:`Agreement` over all concept values: successes and images summed, the Wilson
    interval recomputed (the per-value ones do not combine)."""
    n, successes = sum(a.n for a in parts), sum(a.successes for a in parts)
    lo, hi = wilson_interval(successes, n)
    return Agreement(successes / n, lo, hi, parts[0].chance, n, successes)


#: ``measure.reliance.subspace`` values: the bias CAVs' span, or the bias's LEACE subspace.
SUBSPACES = ("cavs", "leace")
#: The default, as ``conf/measure/default.yaml`` sets it (a settings dict without the key gets it too).
DEFAULT_SUBSPACE = SUBSPACES[0]


def fit_splits(datamodule: ImageData, settings: Mapping[str, Any]) -> list[str]:
    """The splits the LEACE subspace is fitted on: ``fit_split`` (a name or a list), else the
    datamodule's validation and held-out splits (never a test split by default)."""
    names = settings.get("fit_split")
    if names:
        return [str(names)] if isinstance(names, str) else [str(n) for n in names]
    return [*datamodule.val_names, *getattr(datamodule, "heldout_names", [])]


def ablated_subspace(model: nn.Module, datamodule: ImageData, bias: BiasSubspace, layer: str, num_classes: int,
                     settings: Mapping[str, Any]) -> Tensor:
    """``[d, r]`` the subspace the reliance measure ablates (``settings["subspace"]``): the bias
    CAVs (``cavs``, the default) or the bias's LEACE subspace (``leace``: fitted on the labelled
    inputs of :func:`fit_splits`, group-balanced; :mod:`cdistill.causal.bias_span`), in the CAVs' space.

    Raises:
        CdistillError: An unknown ``subspace``, or a LEACE subspace that cannot be fitted.
    """
    kind = str(settings.get("subspace") or DEFAULT_SUBSPACE)
    if kind not in SUBSPACES:
        raise unknown_name("measure.reliance.subspace", kind, SUBSPACES, "Set measure.reliance.subspace to one of these.")
    if kind == "cavs":  # the CAVs are already fitted: their span is the subspace
        return bias.vectors
    names = fit_splits(datamodule, settings)
    data: ConcatDataset[Any] = ConcatDataset([datamodule.split(n) for n in names])
    num_bias = int(getattr(datamodule, "num_bias_groups", None) or num_classes)
    span, _ = bias_leace_span(model, layer, data, num_classes=num_classes, num_bias=num_bias, space=bias.space)
    log.info("reliance: the bias's LEACE subspace at %s has rank %d (fitted on %s)", layer, span.shape[1], names)
    return span


def reliance_report(model: nn.Module, datamodule: ImageData, concepts: ConceptsConfig, layer: str, num_classes: int,
                    settings: Mapping[str, Any]) -> Reliance:
    """The ``reliance/*`` metrics of the module docstring and the detail the plots need.

    Args:
        model: The student (eval mode, on its device).
        datamodule: Set up; gives ``split(name)``, ``normalize``, size and channels.
        concepts: ``model.concepts`` (spec, terms, CAV settings).
        layer: The measured layer (already resolved).
        num_classes: Classes of the task.
        settings: ``measure.reliance``: ``split`` (a name or a list, concatenated), ``max_inputs``, ``mode``, ``k`` (``null``:
            rank + 2; 0: no causal share), ``causal_inputs``, ``max_iter``, ``seed``, and optionally
            ``concept_images`` (per concept set; null: :data:`~cdistill.concepts.layer_choice.MAX_IMAGES`),
            ``subspace`` (:func:`ablated_subspace`; the causal share is measured in the same subspace)
            and ``fit_split`` (:func:`fit_splits`).
    """
    bias = bias_subspace(model, datamodule, concepts, layer, num_classes, settings.get("concept_images"))
    vectors = ablated_subspace(model, datamodule, bias, layer, num_classes, settings)
    subset = measure_subset(datamodule, settings)
    abl = concept_ablation(model, layer, vectors, subset, space=bias.space, mode=str(settings["mode"]),
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
    # Per value for the plot; pooled (exactly the agreement over all images) for the table.
    per_value = [concept_only_agreement(model, [images], [k]) for images, k in zip(bias.images, bias.classes, strict=True)]
    agree = pooled_agreement(per_value)
    out |= {"reliance/concept_agreement": agree.rate, "reliance/concept_agreement_lo": agree.lo,
            "reliance/concept_agreement_hi": agree.hi, "reliance/chance": agree.chance}
    values = [bias_term(concepts).concept.format(y=k) for k in bias.classes]
    detail = RelianceDetail(values, list(bias.classes), per_value)
    k = settings.get("k")
    k = abl.rank + 2 if k is None else int(k)
    if k > 0:
        n = min(int(settings["causal_inputs"]), len(subset))
        loader = DataLoader(Subset(subset, list(range(n))), batch_size=256, shuffle=False)
        dim = vectors.shape[0]
        basis = extract_causal_bases(model, layer, loader, min(k, dim), mode=str(settings["mode"]), space=bias.space,
                                     max_iter=int(settings["max_iter"]), seed=int(settings["seed"]))[layer]
        align = causal_alignment(basis.basis, vectors, basis.energies)
        out["reliance/causal_share_in_bias"] = align.share
        detail = RelianceDetail(values, list(bias.classes), per_value, basis.energies.detach().double().cpu().tolist(),
                                align.shares.tolist(), abl.rank / dim)
    return Reliance(out, detail)


def reliance_metrics(model: nn.Module, datamodule: ImageData, concepts: ConceptsConfig, layer: str, num_classes: int,
                     settings: Mapping[str, Any]) -> dict[str, float]:
    """The flat ``reliance/*`` metrics of :func:`reliance_report` (arguments as there)."""
    return reliance_report(model, datamodule, concepts, layer, num_classes, settings).metrics
