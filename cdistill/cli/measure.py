"""Measure a trained student without training it: ``cdistill-measure`` (or ``python -m
cdistill.cli.measure``), a Hydra entry over ``conf/train.yaml`` like ``cdistill-train``::

    cdistill-measure experiment=color_mnist/cd measure.ckpt=logs/.../seed0/cd/student.pt
    cdistill-measure data=folder data.root=my_data model.student.name=resnet18 \\
        model.concepts.spec=my_concepts.yaml pipeline.tcav.concept=water measure.ckpt=run/student.pt

The experiment's data and concept spec are used; the student is the experiment's architecture
with ``measure.ckpt``'s weights (a run's ``student.pt``, a cdistill ``.ckpt``, or a run folder),
or ``measure.student=<name>`` (registry, ``timm:<m>``, ``torchvision:<m>``) with that file.

Each measure in ``measure.measures`` adds flat metrics; the run directory gets ``measure.json``
(all of them), ``measure.md`` (tables) and the measures' plots:

- ``accuracy``: per evaluation split ``<split>/acc``, ``acc_aligned``, ``acc_conflicting``,
  ``acc_worst_group``, ``acc_group_mean`` and ``acc_group<label>_<bias>``; ``groups.png``;
- ``tcav``: TCAV of ``measure.tcav.concepts`` (default ``pipeline.tcav.concept``) with
  Holm-corrected p-values against the random pool; ``tcav.png`` and ``tcav.json``;
- ``reliance``: interventional reliance on the bias term's concept (``measure.reliance.*``,
  :mod:`cdistill.cli.reliance_report`): ``reliance/ablation_kl`` (and ``_random``, the control),
  ``reliance/acc_drop`` (``_conflicting``, ``_aligned``), ``reliance/concept_agreement``
  (``_lo``, ``_hi``; ``reliance/chance``) and ``reliance/causal_share_in_bias``;
  ``reliance_spectrum.png``, ``reliance_agreement.png`` (:mod:`cdistill.cli.reliance_plots`) and
  ``reliance.json`` (per concept value and per causal direction). ``measure.reliance.layer=reliance``
  (also ``measure.tcav.layer=reliance``) measures at the layer the reliance layer rule chooses on
  the measured model (:mod:`cdistill.cli.reliance_layer`; ``reliance_layer.json`` lists every
  candidate); ``auto`` keeps the CAV-separability choice of ``model.layer=auto``;
- ``reliance_layer``: only that rule's scan (``reliance_layer.json``;
  ``reliance_layer/net_kl/<layer>`` per candidate).

More measures plug in with :func:`register_measure`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from cdistill.causal import RelianceLayerScan
from cdistill.cli.entry import hydra_entry
from cdistill.cli.reliance_layer import is_rule, scan_metrics, scan_reliance_layer, write_scan
from cdistill.cli.reliance_plots import plot_agreement, plot_spectrum
from cdistill.cli.reliance_report import Reliance, reliance_report
from cdistill.cli.tcav_report import plot_tcav, summary, tcav_table
from cdistill.cli.train import instantiate
from cdistill.concepts.layer_choice import LayerChoiceError, auto_layer, recorded_layer
from cdistill.erasure.saved import attach_erasers, saved_erasers
from cdistill.errors import CdistillError
from cdistill.models.layers import is_auto, resolve_layer
from cdistill.models.load import FIX, load_student, resolve_weights
from cdistill.models.students import check_input_channels, check_input_size, create_student
from cdistill.objective.config import ConceptsConfig
from cdistill.tasks.metrics import BiasGroupAccuracy
from cdistill.utils.capture import eval_mode
from cdistill.utils.checkpoint_files import load_torch_file, recorded_config, run_checkpoint
from cdistill.utils.datamodule import ImageData, SplitData
from cdistill.utils.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class MeasureContext:
    """What a measure gets.

    Attributes:
        student: The trained student (eval mode, on ``device``).
        datamodule: The experiment's datamodule, set up (``split(name)``, ``normalize``, ...).
        cfg: The composed config (``measure.*``, ``pipeline.tcav.*``, ``model.*``).
        out: The run directory (plots go here).
        device: Where the student lives.
        scan: The reliance layer rule's scan of this student, once a measure asked for it.
    """

    student: nn.Module
    datamodule: ImageData
    cfg: DictConfig
    out: Path
    device: torch.device
    scan: RelianceLayerScan | None = field(default=None)


#: A measure: context -> flat metrics (``<split>/<name>`` or ``<measure>/<name>``, floats).
Measure = Callable[[MeasureContext], dict[str, float]]
MEASURES: Registry[Measure] = Registry("measure", "Set measure.measures to registered names.")
register_measure = MEASURES.register


def eval_splits(datamodule: SplitData, names: Sequence[str] | None) -> list[str]:
    """``names``, or the datamodule's validation and test splits."""
    return list(names) if names else [*datamodule.val_names, *datamodule.test_names]


@torch.no_grad()
def split_accuracy(student: nn.Module, dataset: Any, num_classes: int, num_groups: int, device: torch.device,
                   batch_size: int = 256) -> dict[str, float]:
    """Accuracy of ``student`` on ``dataset`` (batches ``{"image", "label", "bias"}``), overall
    and per bias group (:class:`~cdistill.tasks.metrics.BiasGroupAccuracy`), plus
    ``acc_group<label>_<bias>`` of every non-empty ``(label, bias)`` group."""
    groups = BiasGroupAccuracy(num_groups, num_classes)
    correct = total = 0
    with eval_mode(student):
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            pred = student(batch["image"].to(device)).argmax(1).cpu()
            label, bias = batch["label"].long(), batch["bias"].long()
            correct += int((pred == label).sum())
            total += len(label)
            groups.update(pred, label, bias)
    out = {"acc": correct / max(total, 1)} | {k: float(v) for k, v in groups.compute().items()}
    seen = groups.group_total > 0
    for y, b in seen.nonzero().tolist():
        out[f"acc_group{y}_{b}"] = float(groups.group_correct[y, b]) / float(groups.group_total[y, b])
    return out


@register_measure("accuracy")
def accuracy_measure(ctx: MeasureContext) -> dict[str, float]:
    """Per-split and per-group accuracy (see the module docstring); writes ``groups.png``."""
    dm, cfg = ctx.datamodule, ctx.cfg
    num_classes = int(dm.num_classes)
    num_groups = int(getattr(dm, "num_bias_groups", cfg.model.get("num_bias_groups") or num_classes))
    metrics: dict[str, float] = {}
    for name in eval_splits(dm, cfg.measure.get("splits")):
        res = split_accuracy(ctx.student, dm.split(name), num_classes, num_groups, ctx.device)
        metrics |= {f"{name}/{k}": v for k, v in res.items()}
    plot_groups(metrics, ctx.out / "groups.png")
    return metrics


def plot_groups(metrics: dict[str, float], path: Path) -> Path:
    """Bars of overall, worst-group and mean group accuracy per split (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = sorted({k.split("/")[0] for k in metrics if k.endswith("/acc")})
    keys = [("acc", "all"), ("acc_worst_group", "worst group"), ("acc_group_mean", "group mean")]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(splits)), 3.2))
    xs = np.arange(len(splits))
    for i, (key, label) in enumerate(keys):
        ax.bar(xs + (i - 1) * 0.27, [metrics.get(f"{s}/{key}", np.nan) for s in splits], width=0.27, label=label)
    ax.set_xticks(xs, splits, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@register_measure("tcav")
def tcav_measure(ctx: MeasureContext) -> dict[str, float]:
    """TCAV with significance (see the module docstring); writes ``tcav.png`` and ``tcav.json``."""
    cfg, mt, tc = ctx.cfg, ctx.cfg.measure.tcav, ctx.cfg.pipeline.tcav
    concepts = list(mt.get("concepts") or ([tc.concept] if tc.get("concept") else []))
    spec = cfg.model.get("concepts", {}).get("spec") if "concepts" in cfg.model else None
    if not concepts or not spec:
        raise CdistillError("The tcav measure needs a concept spec (model.concepts.spec) and concepts "
                            "(measure.tcav.concepts=[...] or pipeline.tcav.concept); or drop it from measure.measures.")
    layer = str(mt.get("layer") or tc.get("layer") or cfg.model.get("layer") or "")
    if not layer:
        raise CdistillError("The tcav measure needs a layer: measure.tcav.layer=<module path> (or model.layer).")
    solver = ConceptsConfig.from_dict(OmegaConf.to_container(cfg.model.concepts, resolve=True)).cav.solver  # type: ignore[arg-type]
    layer = measured_layer(ctx, layer)
    scores = tcav_table(ctx.student, ctx.datamodule, str(spec), layer, [str(c) for c in concepts],
                        random=str(tc.random), target=str(tc.target), solver=solver,
                        split=str(mt.get("split") or "val"), correction=str(mt.get("correction") or "holm"))
    plot_tcav(scores, ctx.out / "tcav.png")
    (ctx.out / "tcav.json").write_text(json.dumps([asdict(s) for s in scores], indent=2))
    out = summary(scores)
    for s in scores:
        out[f"tcav/{s.concept}"] = s.score
        out[f"tcav_p/{s.concept}"] = s.p_corrected
    return out


@register_measure("reliance")
def reliance_measure(ctx: MeasureContext) -> dict[str, float]:
    """Reliance on the bias term's concept (see the module docstring), at the layer the tcav
    measure would use (:func:`reliance_layer`); writes ``reliance_spectrum.png`` (when the
    causal share is measured), ``reliance_agreement.png`` and ``reliance.json`` (the detail)."""
    cfg = ctx.cfg
    if "concepts" not in cfg.model or not cfg.model.concepts.get("spec"):
        raise CdistillError("The reliance measure needs a concept spec (model.concepts.spec) with a '{y}' bias term; "
                            "or drop it from measure.measures.")
    layer = reliance_layer(cfg)
    if not layer:
        raise CdistillError("The reliance measure needs a layer: measure.reliance.layer=<module path> (or model.layer).")
    res = config_reliance(ctx.student, ctx.datamodule, cfg, measured_layer(ctx, layer))
    panel = [("", {"measured": res.detail})]
    plot_spectrum(panel, ctx.out / "reliance_spectrum.png")
    plot_agreement(panel, ctx.out / "reliance_agreement.png")
    (ctx.out / "reliance.json").write_text(json.dumps(asdict(res.detail), indent=2))
    return res.metrics


@register_measure("reliance_layer")
def reliance_layer_measure(ctx: MeasureContext) -> dict[str, float]:
    """Only the reliance layer rule (:mod:`cdistill.cli.reliance_layer`) on the student: writes
    ``reliance_layer.json``; per candidate ``reliance_layer/net_kl/<layer>`` (and the KLs)."""
    return scan_metrics(reliance_scan(ctx))


def reliance_scan(ctx: MeasureContext) -> RelianceLayerScan:
    """The reliance layer rule on the measured student (once per run; ``reliance_layer.json``)."""
    if ctx.scan is None:
        concepts, settings = _reliance_settings(ctx.cfg, ctx.datamodule)
        ctx.scan = scan_reliance_layer(ctx.student, ctx.datamodule, concepts, int(ctx.datamodule.num_classes), settings)
        write_scan(ctx.scan, ctx.out)
    return ctx.scan


def measure_device(cfg: DictConfig) -> torch.device:
    """Where a measured student runs: the GPU when there is one and ``measure.gpu`` allows it."""
    return torch.device("cuda" if torch.cuda.is_available() and cfg.measure.get("gpu", True) else "cpu")


def reliance_layer(cfg: DictConfig) -> str:
    """The layer spec the reliance measure reads: ``measure.reliance.layer``, else
    ``measure.tcav.layer``, ``pipeline.tcav.layer``, ``model.layer`` (``""``: none; may be ``auto``)."""
    return str(cfg.measure.reliance.get("layer") or cfg.measure.tcav.get("layer") or cfg.pipeline.tcav.get("layer")
               or cfg.model.get("layer") or "")


def _reliance_settings(cfg: DictConfig, datamodule: ImageData) -> tuple[ConceptsConfig, dict[str, Any]]:
    """The config's ``model.concepts`` and ``measure.reliance`` settings (``split`` null: the
    datamodule's val and test splits), as the reliance measure and the layer rule take them."""
    concepts = ConceptsConfig.from_dict(OmegaConf.to_container(cfg.model.concepts, resolve=True))  # type: ignore[arg-type]
    settings = OmegaConf.to_container(cfg.measure.reliance, resolve=True)
    assert isinstance(settings, dict)
    split = settings.get("split")
    settings["split"] = eval_splits(datamodule, [split] if isinstance(split, str) else split)
    return concepts, {str(k): v for k, v in settings.items()}


def config_reliance(student: nn.Module, datamodule: ImageData, cfg: DictConfig, layer: str) -> Reliance:
    """:func:`~cdistill.cli.reliance_report.reliance_report` of ``student`` at ``layer`` (resolved)
    with :func:`_reliance_settings`. Used by this measure and by the pipeline."""
    concepts, settings = _reliance_settings(cfg, datamodule)
    return reliance_report(student, datamodule, concepts, layer, int(datamodule.num_classes), settings)


def config_reliance_scan(student: nn.Module, datamodule: ImageData, cfg: DictConfig) -> RelianceLayerScan:
    """:func:`~cdistill.cli.reliance_layer.scan_reliance_layer` of ``student`` with
    :func:`_reliance_settings` (the pipeline scans its base model with it)."""
    concepts, settings = _reliance_settings(cfg, datamodule)
    return scan_reliance_layer(student, datamodule, concepts, int(datamodule.num_classes), settings)


def measured_layer(ctx: MeasureContext, layer: str) -> str:
    """``layer``, with ``reliance`` read as the reliance layer rule's choice on the measured model
    (:func:`reliance_scan`), and ``auto`` as the layer the measured run chose (its
    ``layer_choice.json``), else chosen by the CAV scan of the measured model itself (a base
    model: what a concept run from it would choose), else (no concept terms, or no layer
    passes: warned) the stem."""
    if is_rule(layer):
        return reliance_scan(ctx).layer
    if not is_auto(layer):
        return layer
    recorded = recorded_layer(resolve_weights(str(ctx.cfg.measure.ckpt), "measure.ckpt"))
    if recorded is not None:
        return recorded
    concepts = ctx.cfg.model.get("concepts") if "concepts" in ctx.cfg.model else None
    if concepts is not None and concepts.get("terms"):
        try:
            return auto_layer(ctx.student, ctx.datamodule, OmegaConf.to_container(concepts, resolve=True),  # type: ignore[arg-type]
                              int(ctx.cfg.model.num_classes)).layer
        except LayerChoiceError as err:  # a measure still runs (a concept the model does not read scores so)
            log.warning("%s\nThe measure uses the stem; set measure.tcav.layer to choose.", err)
    return resolve_layer(ctx.student, layer)


def build_student(cfg: DictConfig, datamodule: SplitData) -> nn.Module:
    """The student to measure: ``measure.student`` (a name) with ``measure.ckpt``'s weights,
    else the config's ``model.student`` architecture with them."""
    ckpt = cfg.measure.get("ckpt")
    if not ckpt:
        raise CdistillError("measure.ckpt is not set: give the trained student (a run's student.pt, a cdistill "
                            ".ckpt, or a run folder), e.g. measure.ckpt=logs/<task>/runs/<run>/student.pt.")
    file = resolve_weights(str(ckpt), "measure.ckpt")
    if cfg.measure.get("student"):
        return load_student(str(cfg.measure.student), weights=file, image_size=int(datamodule.image_size),
                            in_chans=int(datamodule.num_channels)).model
    kw = OmegaConf.to_container(cfg.model.student, resolve=True)
    assert isinstance(kw, dict)
    student = {str(k): v for k, v in kw.items() if k not in ("init_path", "pretrained", "checkpoint_path")}
    # An erasing run's model is its student with the erasers it trained with (both travel with
    # the weights: cdistill.erasure.saved); measuring the bare student would measure another model.
    erasers = saved_erasers(file)
    if erasers:
        log.info("measure: applying the run's erasers at %s", ", ".join(erasers))
    return attach_erasers(create_student(**student, checkpoint_path=str(file)), erasers)


def write_measure_report(metrics: dict[str, float], out: Path, title: str) -> str:
    """``measure.json`` (every metric) and ``measure.md`` (accuracy per split, then the rest)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "measure.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    splits = sorted({k.split("/")[0] for k in metrics if k.endswith("/acc") and k.count("/") == 1})
    cols = ["acc", "acc_aligned", "acc_conflicting", "acc_worst_group", "acc_group_mean"]
    md = [f"# {title}", "", "Accuracy (%) per split:", "", "| split | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for s in splits:
        cells = [f"{100 * metrics[f'{s}/{c}']:.2f}" if f"{s}/{c}" in metrics else "-" for c in cols]
        md.append(f"| {s} | " + " | ".join(cells) + " |")
    rest = {k: v for k, v in metrics.items() if k.split("/")[0] not in splits}
    if rest:
        md += ["", "| measure | value |", "|---|---|", *[f"| {k} | {v:.4g} |" for k, v in sorted(rest.items())]]
    text = "\n".join(md) + "\n"
    (out / "measure.md").write_text(text)
    return text


def recorded_data_seed(file: Path) -> int | None:
    """The data seed the student in ``file`` was trained with, from its cdistill checkpoint's
    config (a ``student.pt``: the ``checkpoints/last.ckpt`` beside it); None when unrecorded."""
    ckpt = run_checkpoint(file)
    config = recorded_config(load_torch_file(ckpt, "measure.ckpt", FIX)) if ckpt is not None else None
    if config is None:
        return None
    seed = (config.get("data") or {}).get("seed", config.get("seed"))
    return int(seed) if isinstance(seed, int) else None


def check_data_seed(cfg: DictConfig) -> None:
    """Refuse to measure a student on data drawn with another seed than it was trained on: the
    splits and cues are drawn from the seed, so another seed's test split holds other images,
    some of them the student's training images (a silent leak, not an error, before).

    Raises:
        CdistillError: The recorded and the configured data seeds differ.
    """
    if not cfg.measure.get("ckpt") or cfg.data.get("seed") is None:
        return
    file = resolve_weights(str(cfg.measure.ckpt), "measure.ckpt")
    trained = recorded_data_seed(file)
    if trained is not None and trained != int(cfg.data.seed):
        raise CdistillError(
            f"measure.ckpt={str(file)!r} was trained on data drawn with seed {trained}, but this measure draws "
            f"its data with seed {int(cfg.data.seed)}: the splits and cues come from the seed, so its test split "
            f"would hold other images, some of them this student's training images. Pass seed={trained}."
        )


def run_measure(cfg: DictConfig) -> dict[str, float]:
    """Load the data and the student, run every measure of ``measure.measures``, write the report."""
    names = [str(n) for n in cfg.measure.measures]
    for name in names:
        MEASURES.get(name)  # an unknown name fails before anything loads
    check_data_seed(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    student = build_student(cfg, datamodule)
    check_input_channels(student, datamodule.num_channels, "the measured student")
    if isinstance(getattr(student, "image_size", None), int):
        check_input_size(student, int(datamodule.image_size), "the measured student")
    device = measure_device(cfg)
    student.to(device).eval()
    out = Path(str(cfg.measure.get("out") or cfg.paths.output_dir))
    ctx = MeasureContext(student, datamodule, cfg, out, device)
    metrics: dict[str, float] = {}
    for name in names:
        metrics |= MEASURES.get(name)(ctx)
    text = write_measure_report(metrics, out, f"{cfg.task_name}: measures of {cfg.measure.ckpt}")
    log.info("\n" + text + f"\nwritten to {out}/measure.json, measure.md")
    return metrics


main = hydra_entry(run_measure, "Console entry point: ``cdistill-measure experiment=... measure.ckpt=<student>``.")


if __name__ == "__main__":
    main()
