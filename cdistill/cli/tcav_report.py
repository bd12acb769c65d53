"""TCAV of named concepts on a datamodule's images, with multiple-comparison correction and a
bar plot; used by the pipeline and by :class:`TCAVCallback` (logged every validation epoch).

Sign convention (Kim et al. 2018): the TCAV score is the fraction of inputs whose directional
derivative ``∇_a f(x) · v_C`` is positive, where ``f`` is the class logit (``target=logit``)
or the log-probability of the true class (``target=logprob``) and ``v_C`` points towards the
concept. 1.0: moving towards the concept raises the class score for every input; 0.5: no
consistent effect.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from cdistill.cli.loggers import log_pngs
from cdistill.concepts import load_spec, preprocess
from cdistill.concepts.cav import DEFAULT_SOLVER
from cdistill.concepts.tcav import benjamini_hochberg, holm, run_tcav, target_gradients
from cdistill.errors import CdistillError
from cdistill.utils.capture import collect_activations, eval_mode
from cdistill.utils.datamodule import ImageData, attached_image_data


@dataclass
class ConceptScore:
    """TCAV of one concept (for class-indexed concepts: on that class's images)."""

    concept: str
    layer: str
    score: float
    std: float
    random_score: float
    p_value: float
    p_corrected: float
    effect_size: float


def tcav_table(
    model: nn.Module,
    datamodule: ImageData,
    spec: str,
    layer: str,
    concepts: Sequence[str],
    *,
    random: str = "random",
    target: str = "logit",
    solver: str = DEFAULT_SOLVER,
    split: str = "val",
    correction: str = "holm",
) -> list[ConceptScore]:
    """TCAV scores and corrected p-values for ``concepts`` at ``layer``.

    Args:
        model: The student.
        datamodule: Gives the images (``split``), preprocessing and channels.
        spec: Concept-set spec (the random pool ``random/0..S-1`` must be in it).
        layer: Layer path.
        concepts: Concept names; ``"{y}"`` expands to one concept per class, scored on that
            class's images (e.g. ``color_{y}``); other names are scored on all images.
        random: Name of the random pool.
        target: ``logit`` or ``logprob``.
        solver: CAV solver.
        split: Datamodule split whose images are scored.
        correction: ``holm`` or ``bh`` (Benjamini-Hochberg), across all concepts scored.
    """
    sets = load_spec(spec, channels=datamodule.num_channels, size=datamodule.image_size)
    with eval_mode(model):  # restored also when a concept is missing or TCAV fails
        device = next(model.parameters()).device

        def acts(name: str) -> torch.Tensor:
            x = preprocess(sets[name], datamodule.normalize, channels=datamodule.num_channels, size=datamodule.image_size)
            return collect_activations(model, layer, [x.to(device)])

        randoms = [acts(k) for k in sorted(sets) if k.startswith(f"{random}/")]
        if len(randoms) < 2:
            raise CdistillError(f"The concept spec {spec!r} needs a random pool {random!r} split into >= 2 sets.")
        data = datamodule.split(split)
        images = torch.stack([data[i]["image"] for i in range(len(data))]).to(device)
        labels = torch.as_tensor([int(data[i]["label"]) for i in range(len(data))], device=device)
        jobs: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        for template in concepts:
            if "{y}" in template:
                jobs += [(template.format(y=k), images[labels == k], labels[labels == k]) for k in range(datamodule.num_classes)]
            else:
                jobs.append((template, images, labels))
        results = []
        for name, x, y in jobs:
            if name not in sets:
                raise CdistillError(f"Concept {name!r} is not in the spec {spec!r}; it has {sorted(sets)}.")
            grads = target_gradients(model, layer, x, y, target)
            results.append(run_tcav(grads, layer, acts(name), randoms, solver=solver, concept=name))
    pvals = [r.p_value for r in results]
    corrected = holm(pvals) if correction == "holm" else benjamini_hochberg(pvals)
    return [
        ConceptScore(r.concept, layer, r.mean, r.std, r.random_mean, r.p_value, c, r.effect_size)
        for r, c in zip(results, corrected, strict=True)
    ]


def summary(scores: Sequence[ConceptScore]) -> dict[str, float]:
    """Mean score, median corrected p-value and the fraction significant at 0.05."""
    return {
        "tcav": float(np.mean([s.score for s in scores])),
        "tcav_p": float(np.median([s.p_corrected for s in scores])),
        "tcav_significant": float(np.mean([s.p_corrected < 0.05 for s in scores])),
    }


def plot_tcav(scores: Sequence[ConceptScore], path: str | Path, title: str = "") -> Path:
    """Bar per concept (± std over random negative sets), random baseline as a line, ``*`` on
    concepts significant after correction (p < 0.05). Saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(scores)), 3.2))
    xs = np.arange(len(scores))
    ax.bar(xs, [s.score for s in scores], yerr=[s.std for s in scores], color="tab:blue", capsize=2)
    ax.plot(xs, [s.random_score for s in scores], "k_", markersize=14, label="random CAVs")
    for x, s in zip(xs, scores, strict=True):
        if s.p_corrected < 0.05:
            ax.text(float(x), min(s.score + s.std + 0.03, 1.05), "*", ha="center")
    ax.set_xticks(xs, [s.concept for s in scores], rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("TCAV score")
    ax.set_title(title or f"TCAV at {scores[0].layer if scores else ''} (* p<0.05, corrected)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


class TCAVCallback(pl.Callback):
    """Log TCAV of concepts every ``every_n_epochs`` validation epochs, with a plot.

    Logs ``tcav/<concept>`` (score) and ``tcav_p/<concept>`` (corrected p-value), plus the
    ``tcav/mean`` summary; saves ``<output_dir>/tcav/epoch_XXX.png`` and ``.json``, and sends
    the plot to wandb when a ``WandbLogger`` is active.

    Args:
        spec: Concept-set spec. layer: Student layer path. concepts: Concept names (``{y}``
        allowed).
        every_n_epochs: Frequency. output_dir: Where plots go (default: trainer's log dir).
        **table_kw: ``random``, ``target``, ``solver``, ``correction`` of :func:`tcav_table`
            (its defaults apply to those not given).
    """

    #: The keyword settings of :func:`tcav_table` the callback passes on (not ``split``: it scores val).
    TABLE_KEYS = ("random", "target", "solver", "correction")

    def __init__(
        self, spec: str, layer: str, concepts: Sequence[str], every_n_epochs: int = 1, output_dir: str | None = None,
        **table_kw: str,
    ) -> None:
        unknown = sorted(set(table_kw) - set(self.TABLE_KEYS))
        if unknown:
            raise CdistillError(f"callbacks.tcav: unknown setting(s) {unknown}; the TCAV settings are "
                                f"{list(self.TABLE_KEYS)}, every_n_epochs and output_dir.")
        self.spec, self.layer, self.concepts = spec, layer, list(concepts)
        self.table_kw = dict(table_kw)
        self.every_n_epochs = every_n_epochs
        self.output_dir = output_dir

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        student = getattr(pl_module, "student", pl_module)
        with torch.inference_mode(False), torch.enable_grad():
            scores = tcav_table(
                student, attached_image_data(trainer, pl_module), self.spec, self.layer, self.concepts, **self.table_kw,
            )
        values = {f"tcav/{s.concept}": s.score for s in scores}
        values |= {f"tcav_p/{s.concept}": s.p_corrected for s in scores}
        values["tcav/mean"] = summary(scores)["tcav"]
        pl_module.log_dict(values, rank_zero_only=True)
        if trainer.is_global_zero:
            out = Path(self.output_dir or trainer.default_root_dir) / "tcav"
            png = plot_tcav(scores, out / f"epoch_{trainer.current_epoch:03d}.png")
            (out / f"epoch_{trainer.current_epoch:03d}.json").write_text(
                json.dumps([asdict(s) for s in scores], indent=2)
            )
            log_pngs(trainer.loggers, {"tcav": png}, trainer.global_step)
