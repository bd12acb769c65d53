"""Check a concept spec before any training: what each set holds, montages to look at, whether
every term's concept and negative exist, and how well each pair separates at candidate layers.

:func:`scan_layers` is the layer scan of ``python -m cdistill.concepts check SPEC --model ...``
and of the pipeline's CAV gate check; it is a plain function (no CLI, no Lightning) so that an
automatic layer choice can rank layers with the same rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from cdistill.concepts.cav import fit_cav
from cdistill.errors import CdistillError, close_names
from cdistill.objective.cav_fitter import concept_rows, negative_rows
from cdistill.objective.config import CAVConfig, ConceptTerm, term_name
from cdistill.utils.capture import capture, eval_mode, resolve_module

#: Module types whose output is a post-activation map (what a CAV at ``relu1``/``pool1`` sees).
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.ReLU6, nn.Hardswish,
               nn.Mish, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


@dataclass(frozen=True)
class SetInfo:
    """One concept set of a spec: ``name``, ``count`` images of ``channels x height x width``."""

    name: str
    count: int
    channels: int
    height: int
    width: int


@dataclass(frozen=True)
class ConceptPair:
    """One CAV a term needs: ``concept`` (a set) vs ``negative`` (a set or a ``<name>/<i>``
    pool); ``term`` is the term's log name (:func:`~cdistill.objective.config.term_name`)."""

    concept: str
    negative: str
    term: str


@dataclass(frozen=True)
class LayerScore:
    """Held-out accuracy of one pair's CAV at one layer.

    Attributes:
        concept, negative, term: The pair (see :class:`ConceptPair`).
        layer: Module path of the student.
        accuracy: Held-out accuracy in ``[0, 1]`` (balanced over concept and negative rows,
            as :func:`cdistill.concepts.cav.fit_cav` reports it; 0.5 separates nothing).
        passes: ``accuracy >= min_accuracy`` (the training gate, ``model.concepts.min_accuracy``).
    """

    concept: str
    negative: str
    term: str
    layer: str
    accuracy: float
    passes: bool


def describe_sets(sets: Mapping[str, Tensor]) -> list[SetInfo]:
    """Count and image size of every set (``uint8 [N, C, H, W]`` as :func:`load_spec` gives)."""
    return [SetInfo(name, int(x.shape[0]), int(x.shape[1]), int(x.shape[2]), int(x.shape[3])) for name, x in sets.items()]


def montage(images: Tensor, max_images: int = 64) -> Image.Image:
    """A square grid of the first ``max_images`` images ``uint8 [N, C, H, W]`` (C = 1 or 3),
    one pixel of black between them."""
    x = images[:max_images]
    n, c, h, w = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + 1) + 1, cols * (w + 1) + 1, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + q * (w + 1) : 1 + q * (w + 1) + w] = x[i].permute(1, 2, 0).numpy()
    return Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")


def write_montages(sets: Mapping[str, Tensor], out: str | Path, max_images: int = 64) -> list[Path]:
    """Write ``<out>/<set>.png`` (``/`` of pool sets read ``_``) for every set; return the paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, images in sets.items():
        path = folder / f"{name.replace('/', '_')}.png"
        montage(images, max_images).save(path)
        paths.append(path)
    return paths


def term_pairs(terms: Sequence[ConceptTerm], num_classes: int) -> list[ConceptPair]:
    """The distinct ``(concept, negative)`` pairs the terms need: a concept with ``{y}`` gives
    one pair per class the term acts on (``term.classes``, else ``0 .. num_classes - 1``)."""
    out: dict[tuple[str, str], ConceptPair] = {}
    for term in terms:
        classes = (term.classes if term.classes is not None else range(num_classes)) if "{y}" in term.concept else [0]
        for k in classes:
            concept = term.concept.format(y=k)
            out.setdefault((concept, term.negative), ConceptPair(concept, term.negative, term_name(term)))
    return list(out.values())


def has_set(name: str, set_names: Sequence[str]) -> bool:
    """Whether ``name`` is a set, or a pool ``name/0 ..`` (as negatives and random sets may be)."""
    return name in set_names or any(s.startswith(f"{name}/") for s in set_names)


def check_pairs(pairs: Sequence[ConceptPair], set_names: Sequence[str], spec: str, where: str = "model.concepts.terms") -> None:
    """Raise one error naming every concept or negative of ``pairs`` that the spec lacks.

    Raises:
        CdistillError: Listing each missing name with close names and the spec's sets.
    """
    missing = sorted({n for p in pairs for n in (p.concept, p.negative) if not has_set(n, set_names)})
    if not missing:
        return
    pools = sorted({s.split("/")[0] for s in set_names})
    hints = []
    for name in missing:
        close = close_names(name, pools)
        hints.append(f"{name!r}" + (f" (close: {', '.join(close)})" if close else ""))
    raise CdistillError(
        f"{where} need(s) concept set(s) {', '.join(hints)}, which the concept spec {spec!r} does not define; "
        f"it has {pools}. Add them to the spec (a for_k entry gives name_0 .. name_K-1) or fix the term."
    )


def activation_layers(model: nn.Module) -> list[str]:
    """Module paths whose output is post-activation (activations and pools, see :data:`ACTIVATIONS`)."""
    return [name for name, m in model.named_modules() if name and isinstance(m, ACTIVATIONS)]


def activation_note(model: nn.Module) -> str:
    """One sentence on where post-activation maps can be read from ``model``."""
    acts = activation_layers(model)
    if acts:
        return f"post-activation layers (nonlinearity or pool modules): {', '.join(acts)}"
    return ("this student has no activation or pool modules: it applies its nonlinearities functionally "
            "(e.g. F.relu), so every module path gives a pre-activation map")


def default_layers(model: nn.Module) -> list[str]:
    """Candidate layers when none are given: the model's top-level children."""
    return [name for name, _ in model.named_children()]


@torch.no_grad()
def layer_rows(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    layers: Sequence[str],
    cav: CAVConfig | None = None,
    batch_size: int = 500,
    blank: Tensor | None = None,
) -> dict[str, dict[str, Tensor]]:
    """CAV training rows of every set at every layer, from one forward pass per batch (every
    layer's output captured at once; the model runs in eval mode, its own modes restored).

    Args:
        model: The student.
        inputs: Set name -> preprocessed images ``float32 [N, C, H, W]``, every set of the spec
            in its order (``position`` mode seeds set ``i``'s row subset with ``i``, as training does).
        layers: Module paths of ``model`` (a wrong one raises, listing close names).
        cav: Row mode (``flatten`` or ``position``) and its settings (default :class:`CAVConfig`).
        batch_size: Images per forward pass.
        blank: ``position`` mode's reference image ``[1, C, H, W]`` (default: zeros).

    Returns:
        Layer -> set name -> rows (:func:`cdistill.objective.cav_fitter.concept_rows`):
        ``[N, d]`` flattened maps, or ``[M, C]`` channel vectors at content positions.
    """
    cav = cav or CAVConfig()
    layers = list(dict.fromkeys(layers))
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def run(images: Tensor) -> dict[str, Tensor]:
        """Layer -> activations ``[N, *shape]`` of ``images``."""
        parts: dict[str, list[Tensor]] = {layer: [] for layer in layers}
        with eval_mode(model), capture(model, layers, detach=True) as store:
            for i in range(0, len(images), batch_size):
                model(images[i : i + batch_size].to(device))
                for layer in layers:
                    parts[layer].append(store[layer])
        return {layer: torch.cat(p) for layer, p in parts.items()}

    by_set = {name: run(x) for name, x in inputs.items()}
    refs: dict[str, Tensor | None] = dict.fromkeys(layers)
    if cav.cav_mode == "position":  # the reference of position rows: a blank image's activation
        image = blank if blank is not None else torch.zeros_like(next(iter(inputs.values()))[:1])
        refs = {layer: act[0] for layer, act in run(image).items()}
    return {layer: concept_rows({name: by_set[name][layer] for name in inputs}, cav, refs[layer]) for layer in layers}


def score_pairs(rows: Mapping[str, Tensor], pairs: Sequence[ConceptPair], layer: str, cav: CAVConfig | None = None) -> list[LayerScore]:
    """Fit each pair's CAV on one layer's ``rows`` (see :func:`layer_rows`) as training would
    (solver, held-out fraction, split seed 0) and score it against the gate."""
    cav = cav or CAVConfig()
    scores = []
    for pair in pairs:
        res = fit_cav(rows[pair.concept], negative_rows(rows, pair.negative), cav.solver,
                      test_fraction=float(cav.test_fraction), seed=0, concept=pair.concept,
                      negative=pair.negative, layer=layer)
        acc = float(res.accuracy)
        scores.append(LayerScore(pair.concept, pair.negative, pair.term, layer, acc, acc >= float(cav.min_accuracy)))
    return scores


def scan_layers(
    model: nn.Module,
    inputs: Mapping[str, Tensor],
    pairs: Sequence[ConceptPair],
    layers: Sequence[str],
    cav: CAVConfig | None = None,
    batch_size: int = 500,
    blank: Tensor | None = None,
) -> list[LayerScore]:
    """Fit each pair's CAV at each layer, as training would, and report its held-out accuracy.

    The rows are those the task fits on (:func:`cdistill.objective.cav_fitter.concept_rows`,
    ``flatten`` or ``position`` mode), the negative may be a pool (``random`` -> every
    ``random/<i>``), and the solver, held-out fraction and split seed (0) are the task's.

    Args:
        model: The student (left in its own train/eval mode; run in eval mode).
        inputs: Set name -> preprocessed images ``float32 [N, C, H, W]`` (see
            :func:`cdistill.concepts.preprocess`); must hold every concept and negative of
            ``pairs``. Give every set of the spec in its order: ``position`` mode seeds each
            set's row subset with its index, as training does.
        pairs: The CAVs to fit (:func:`term_pairs`).
        layers: Module paths of ``model`` (a wrong one raises, listing close names).
        cav: Solver, gate, held-out fraction and row mode (default :class:`CAVConfig`).
        batch_size: Images per forward pass.
        blank: ``position`` mode's reference, the preprocessed blank image ``[1, C, H, W]``
            (training uses an all-zero ``uint8`` image through the same preprocessing);
            default: zeros after preprocessing.

    Returns:
        One :class:`LayerScore` per ``(pair, layer)``, pairs outer and layers inner, in the
        order given: ``len(pairs) * len(layers)`` entries.
    """
    cav = cav or CAVConfig()
    for layer in layers:
        resolve_module(model, layer)
    check_pairs(pairs, list(inputs), "the given sets", where="the concept pairs")
    per_layer = layer_rows(model, inputs, layers, cav, batch_size, blank)
    by = {layer: score_pairs(per_layer[layer], pairs, layer, cav) for layer in dict.fromkeys(layers)}
    return [by[layer][i] for i in range(len(pairs)) for layer in layers]


def format_scan(scores: Sequence[LayerScore]) -> str:
    """A text table: one row per pair, one column per layer, ``*`` under the gate."""
    layers = list(dict.fromkeys(s.layer for s in scores))
    pairs = list(dict.fromkeys((s.concept, s.negative) for s in scores))
    by = {(s.concept, s.negative, s.layer): s for s in scores}
    label = [f"{c} vs {n}" for c, n in pairs]
    width = max([len("concept vs negative"), *map(len, label)]) + 2
    cols = [max(len(layer), 6) + 2 for layer in layers]
    lines = ["concept vs negative".ljust(width) + "".join(layer.rjust(w) for layer, w in zip(layers, cols, strict=True))]
    for (c, n), text in zip(pairs, label, strict=True):
        cells = []
        for layer, w in zip(layers, cols, strict=True):
            s = by[(c, n, layer)]
            cells.append(f"{s.accuracy:.3f}{'' if s.passes else '*'}".rjust(w))
        lines.append(text.ljust(width) + "".join(cells))
    lines.append("(held-out CAV accuracy; * below the gate model.concepts.min_accuracy: the term would be skipped there)")
    return "\n".join(lines)
