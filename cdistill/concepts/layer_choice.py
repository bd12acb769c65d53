"""``model.layer=auto``: the layer chosen from a CAV scan of the model training starts from.

The rule (docs/methods.md §2.10):

1. **Candidates**: the student's downsampling points after its first non-linearity, in forward
   order (:func:`cdistill.models.layers.candidate_layers`: the stem, i.e. the first pooling after
   the first activation, then each later pooling or stage output, ``layer1 .. layer4`` of a
   ResNet; a ViT's blocks), keeping only outputs that are maps (more than one position): the
   pooled head features and the logits never are.
2. **Terms that decide**: every ``desensitize`` term whose concept has ``{y}`` (the cue whose
   values the counterfactual moves between) and no layer of its own; without one, every term
   without a layer of its own.
3. **Score**: a term's held-out CAV accuracy at a layer, averaged over its values: one CAV per
   value (``color_k``) against as many rows drawn from the term's other values (seeded), fitted
   as training fits CAVs (the configured solver, held-out fraction and row mode, split seed 0),
   on at most ``max_images`` images per set; a term with one value: its CAV against its negative.
   Against the other values rather than the term's negative, because that is what the latent
   counterfactual reads (the difference of two values' means), and because a negative that holds
   the concept caps concept-vs-negative accuracy near the gate at every layer: the faces proxy's
   ``gender_k`` vs ``random`` faces (half of them gender ``k``) scores 0.67-0.74 from ``conv1`` to
   ``avgpool``, on the base model and on an untrained one, where ``gender_0`` vs ``gender_1`` is
   0.97 at ``maxpool``; a 0.7 gate there would choose by noise.
4. **Choice**: the earliest candidate where every deciding term's score reaches the gate
   ``model.concepts.min_accuracy``. Early, because the latent counterfactual works best at the
   stem (benchmarks/results/generality.md); a later layer only when the stem cannot read the cue.
   None: a :class:`LayerChoiceError` with the scores per layer and the fixes.

The scan runs once, on the base model, before the concept-distillation module is built
(:func:`cdistill.cli.train.train`, the pipeline, its pre-flight, the measures), is logged and
written beside the run, leaves the global random state untouched and is deterministic: the concept
sets are seeded, the CAV split is seed 0, the model runs in eval mode. One forward pass per batch
captures every candidate; fits stop at the first layer that passes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cdistill.concepts.cav import fit_cav
from cdistill.concepts.check import check_pairs, layer_rows, term_pairs
from cdistill.concepts.sets import load_spec, preprocess
from cdistill.errors import CdistillError
from cdistill.models.layers import candidate_layers
from cdistill.objective.cav_fitter import CAVGateError, negative_rows
from cdistill.objective.config import CAVConfig, ConceptsConfig, ConceptTerm, term_name
from cdistill.utils.capture import capture, eval_mode
from cdistill.utils.datamodule import ImageData

log = logging.getLogger(__name__)

#: Images per concept set the scan uses (the first ones; the sets of our families have <= 300).
MAX_IMAGES = 500


class LayerChoiceError(CAVGateError):
    """No candidate layer reads every deciding term's concept above the gate."""


@dataclass(frozen=True)
class TermScore:
    """One deciding term at one layer.

    Attributes:
        term: The term's log name (:func:`~cdistill.objective.config.term_name`).
        layer: Module path.
        accuracy: Mean held-out CAV accuracy over the term's values (NaN when a fit failed).
        values: Each value's accuracy, in class order.
        against: ``values`` (each value's CAV against the term's other values) or, for a term
            with one value, the negative it was fitted against.
        passes: ``accuracy >= min_accuracy``.
    """

    term: str
    layer: str
    accuracy: float
    values: tuple[float, ...]
    against: str
    passes: bool


@dataclass(frozen=True)
class LayerChoice:
    """What ``model.layer=auto`` became, and why.

    Attributes:
        layer: The chosen module path.
        candidates: The candidates after the shape filter, in forward order.
        scanned: The candidates scored, in order (up to the chosen one, unless all were asked).
        scores: One :class:`TermScore` per (deciding term, scanned layer).
        min_accuracy: The gate.
        note: How the choice was made, in one sentence.
    """

    layer: str
    candidates: tuple[str, ...]
    scanned: tuple[str, ...]
    scores: tuple[TermScore, ...]
    min_accuracy: float
    note: str

    def table(self) -> str:
        """A text table: one row per deciding term, one column per scanned layer, ``*`` under
        the gate, the chosen layer's header marked ``<``."""
        return _table(self.scores, self.scanned, self.min_accuracy, self.layer)

    def summary(self) -> str:
        """The choice, the rule's note and the table, for logs."""
        text = f"model.layer=auto -> {self.layer!r} ({self.note}); candidates {list(self.candidates)}"
        return text + ("\n" + self.table() if self.scores else "")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``layer_choice.json``)."""
        return {"layer": self.layer, "candidates": list(self.candidates), "scanned": list(self.scanned),
                "min_accuracy": self.min_accuracy, "note": self.note,
                "scores": [asdict(s) | {"values": list(s.values)} for s in self.scores]}


def deciding_terms(terms: Sequence[ConceptTerm]) -> list[ConceptTerm]:
    """The terms whose CAVs decide (rule step 2 of the module docstring)."""
    own = [t for t in terms if not t.layer]
    return [t for t in own if t.direction == "desensitize" and "{y}" in t.concept] or own


def _table(scores: Sequence[TermScore], layers: Sequence[str], gate: float, chosen: str | None) -> str:
    terms = list(dict.fromkeys(s.term for s in scores))
    by = {(s.term, s.layer): s for s in scores}
    heads = [f"{layer}{' <' if layer == chosen else ''}" for layer in layers]
    width = max([len("term"), *map(len, terms)]) + 2
    cols = [max(len(h), 6) + 2 for h in heads]
    lines = ["term".ljust(width) + "".join(h.rjust(w) for h, w in zip(heads, cols, strict=True))]
    for term in terms:
        cells = [f"{by[(term, layer)].accuracy:.3f}{'' if by[(term, layer)].passes else '*'}".rjust(w)
                 for layer, w in zip(layers, cols, strict=True)]
        lines.append(term.ljust(width) + "".join(cells))
    lines.append(f"(per term, the mean held-out accuracy of one CAV per value against the term's other values "
                 f"(a one-value term: against its negative); * under the gate {gate}; < chosen)")
    return "\n".join(lines)


def term_values(term: ConceptTerm, num_classes: int) -> list[str]:
    """The concept sets of a term, one per value (``{y}`` over its classes), in class order."""
    return [p.concept for p in term_pairs([term], num_classes)]


def _fit_accuracy(pos: Tensor, neg: Tensor, cav: CAVConfig, concept: str, negative: str, layer: str) -> float:
    """Held-out accuracy of one CAV, fitted as training fits it; NaN where none can be fitted
    (every activation the same: a layer that erased the cue), which fails the gate."""
    try:
        res = fit_cav(pos, neg, cav.solver, test_fraction=float(cav.test_fraction), seed=0, concept=concept,
                      negative=negative, layer=layer)
    except CdistillError as err:
        log.info("model.layer=auto: no CAV %r vs %r can be fitted at %r (%s): it fails the gate",
                 concept, negative, layer, err)
        return math.nan
    return float(res.accuracy)


def _others(rows: Mapping[str, Tensor], values: Sequence[str], k: int) -> Tensor:
    """Rows of the values other than ``values[k]``, ``ceil(n_k / (K - 1))`` of each (``n_k``:
    value ``k``'s rows), drawn with seed ``k``: as many as value ``k`` has, so a fit costs what
    a concept-vs-negative fit costs and the classes are balanced."""
    per = -(-len(rows[values[k]]) // (len(values) - 1))
    gen = torch.Generator().manual_seed(k)
    picked = []
    for j, value in enumerate(values):
        if j != k:
            r = rows[value]
            picked.append(r[torch.randperm(len(r), generator=gen)[:per].to(r.device)])
    return torch.cat(picked)


def term_score(rows: Mapping[str, Tensor], term: ConceptTerm, num_classes: int, layer: str, cav: CAVConfig) -> TermScore:
    """Rule step 3 for one term at one layer (``rows``: set name -> CAV rows there)."""
    values = term_values(term, num_classes)
    accs = []
    for k, value in enumerate(values):
        if len(values) > 1:  # this value against as many rows of the term's other values (a seeded draw)
            accs.append(_fit_accuracy(rows[value], _others(rows, values, k), cav, value, "the other values", layer))
        else:
            accs.append(_fit_accuracy(rows[value], negative_rows(rows, term.negative), cav, value, term.negative, layer))
    mean = sum(accs) / len(accs)
    against = "values" if len(values) > 1 else term.negative
    return TermScore(term_name(term), layer, mean, tuple(accs), against, bool(mean >= float(cav.min_accuracy)))


def _is_map(acts: Tensor) -> bool:
    """Rows of a layer whose per-sample output has positions: ``[N, C, H, W]`` with ``H*W > 1``
    or tokens ``[N, T, D]``; not ``[N, d]`` (head features, logits) nor ``[N, C, 1, 1]``."""
    return acts.ndim >= 3 and math.prod(acts.shape[2:]) > 1


@torch.no_grad()
def _outputs(model: nn.Module, image: Tensor, layers: Sequence[str]) -> dict[str, Tensor]:
    """One image's output ``[1, *shape]`` at each layer (for the shape filter)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with eval_mode(model), capture(model, list(layers), detach=True) as store:
        model(image.to(device))
        return {layer: store[layer] for layer in layers}


def map_candidates(model: nn.Module, probe: Tensor, candidates: Sequence[str] | None = None) -> list[str]:
    """The candidates (default :func:`candidate_layers`) whose output on ``probe`` (one
    preprocessed image ``[1, C, H, W]``) is a map: the layers ``model.layer=auto`` scans.

    Raises:
        CdistillError: No candidate outputs a map.
    """
    layers = list(candidates) if candidates is not None else candidate_layers(model)
    shapes = _outputs(model, probe, layers)
    maps = [layer for layer in layers if _is_map(shapes[layer])]
    if not maps:
        raise CdistillError(f"model.layer=auto: no candidate layer of the student outputs a map ({layers}, shapes "
                            f"{[tuple(shapes[x].shape[1:]) for x in layers]}); set model.layer to a module path.")
    return maps


def choose_layer(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    terms: Sequence[ConceptTerm],
    num_classes: int,
    cav: CAVConfig | None = None,
    *,
    candidates: Sequence[str] | None = None,
    blank: Tensor | None = None,
    batch_size: int = 500,
    scan_all: bool = False,
) -> LayerChoice:
    """Apply the rule of the module docstring to ``model``.

    Args:
        model: The model training starts from (the base model); run in eval mode, its modes kept.
        inputs: Set name -> preprocessed images ``float32 [N, C, H, W]``, every set of the spec
            in its order (as :func:`cdistill.concepts.check.layer_rows` takes them).
        terms: The task's concept terms (:func:`deciding_terms` picks those that decide).
        num_classes: Classes ``{y}`` runs over.
        cav: Solver, gate, held-out fraction and row mode (default :class:`CAVConfig`).
        candidates: Module paths in forward order (default :func:`candidate_layers`).
        blank: ``position`` mode's preprocessed blank image ``[1, C, H, W]``.
        batch_size: Images per forward pass.
        scan_all: Score every candidate (for reports) instead of stopping at the chosen one.

    Returns:
        The :class:`LayerChoice`.

    Raises:
        LayerChoiceError: No candidate passes (the message holds the table and the fixes).
        CdistillError: A deciding term names a set the inputs lack; no candidate is a map.
    """
    cav = cav or CAVConfig()
    gate = float(cav.min_accuracy)
    maps = map_candidates(model, next(iter(inputs.values()))[:1], candidates)
    deciding = deciding_terms(terms)
    if not deciding:
        return LayerChoice(maps[0], tuple(maps), (), (), gate, "no concept term acts at model.layer: the stem")
    check_pairs(term_pairs(deciding, num_classes), list(inputs), "the concept spec",
                where="the terms model.layer=auto scans for")
    rows = layer_rows(model, inputs, maps, cav, batch_size, blank)
    scores: list[TermScore] = []
    chosen = None
    for layer in maps:
        scores += [term_score(rows[layer], term, num_classes, layer, cav) for term in deciding]
        if chosen is None and all(s.passes for s in scores if s.layer == layer):
            chosen = layer
            if not scan_all:
                break
    scanned = tuple(dict.fromkeys(s.layer for s in scores))
    if chosen is None:
        best = max(maps, key=lambda x: min(s.accuracy if s.accuracy == s.accuracy else -1.0
                                           for s in scores if s.layer == x))
        raise LayerChoiceError(
            f"model.layer=auto: at no candidate layer do the bias concept's CAVs reach the gate "
            f"model.concepts.min_accuracy={gate} on the base model:\n{_table(scores, scanned, gate, None)}\n"
            f"Name a layer (model.layer={best} scores best here; `python -m cdistill.concepts check <spec> "
            "--model <base> --config ...` prints every candidate), or give concept images whose cue the model "
            "reads (each value's set differing from the others only in the bias cue, drawn as it looks in the "
            "training images)."
        )
    note = "the stem reads every bias concept" if chosen == maps[0] else (
        f"the first candidate where every bias concept's CAVs reach the gate {gate}")
    return LayerChoice(chosen, tuple(maps), scanned, tuple(scores), gate, note)


def auto_layer(
    model: nn.Module,
    datamodule: ImageData,
    concepts: ConceptsConfig | Mapping[str, Any],
    num_classes: int,
    *,
    max_images: int = MAX_IMAGES,
    batch_size: int = 500,
    scan_all: bool = False,
) -> LayerChoice:
    """:func:`choose_layer` with the concept spec's images as the task sees them: loaded at the
    data's size and channels, normalised by the datamodule (set up here if it is not), the first
    ``max_images`` of each set. The global random state is the same afterwards."""
    cfg = concepts if isinstance(concepts, ConceptsConfig) else ConceptsConfig.from_dict(dict(concepts))
    if not cfg.spec:
        raise CdistillError("model.layer=auto needs the concept spec (model.concepts.spec) to choose the layer.")
    datamodule.setup("fit")  # idempotent in every cdistill datamodule
    kw: dict[str, Any] = {"channels": datamodule.num_channels, "size": datamodule.image_size}
    with torch.random.fork_rng(devices=[]):
        sets = load_spec(cfg.spec, **kw)
        inputs = {name: preprocess(x[:max_images], datamodule.normalize, **kw) for name, x in sets.items()}
        blank = preprocess(torch.zeros_like(next(iter(sets.values()))[:1]), datamodule.normalize, **kw)
        choice = choose_layer(model, inputs, cfg.terms, num_classes, cfg.cav, blank=blank, batch_size=batch_size,
                              scan_all=scan_all)
    log.info(choice.summary())
    return choice


def config_layer(model_cfg: Mapping[str, Any], datamodule: ImageData, checkpoint: str | None = None) -> LayerChoice | None:
    """:func:`auto_layer` for a model config (``cfg.model``) before its module is built.

    The student is built from ``model_cfg["student"]`` with the weights training starts from
    (``checkpoint``, else its ``checkpoint_path``: the base model), under a forked random state,
    so that the module built next initialises exactly as with an explicit ``model.layer``.

    Returns:
        The choice, or ``None`` when ``layer`` is not ``auto`` or no concept term is configured
        (the module then resolves ``auto`` to the structural stem).
    """
    from omegaconf import OmegaConf

    from cdistill.models.layers import is_auto
    from cdistill.models.students import create_student

    plain = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
    assert isinstance(plain, dict)
    concepts = dict(plain.get("concepts") or {})
    if not is_auto(plain.get("layer")) or not concepts.get("terms"):
        return None
    student_kw = {str(k): v for k, v in dict(plain["student"]).items()}
    if checkpoint is not None:
        student_kw["checkpoint_path"] = checkpoint
    with torch.random.fork_rng(devices=[]):
        student = create_student(**student_kw)
    if not student_kw.get("checkpoint_path"):
        log.info("model.layer=auto: no model.student.checkpoint_path, so the layer is chosen on the freshly "
                 "initialised student (the model the CAVs are fitted on)")
    return auto_layer(student, datamodule, concepts, int(plain.get("num_classes") or student_kw.get("num_classes", 10)))


#: Where a run records its choice (the run directory, beside ``student.pt``).
CHOICE_FILE = "layer_choice.json"


def recorded_layer(weights: str | Path) -> str | None:
    """The layer ``auto`` became for the run a weights file belongs to: ``layer_choice.json`` in
    the file's folder or the one above (a run's ``student.pt``, its ``checkpoints/*.ckpt``; a
    pipeline's ``seed<k>/cd/student.pt``, and its ``seed<k>/base/student.pt``, whose seed folder
    holds the choice made on it); ``None`` when there is none (e.g. a lone base run)."""
    for folder in list(Path(weights).resolve().parents)[:2]:
        path = folder / CHOICE_FILE
        if path.is_file():
            return str(json.loads(path.read_text())["layer"])
    return None
