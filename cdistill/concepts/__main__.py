"""``python -m cdistill.concepts check SPEC`` (or ``cdistill-concepts check SPEC``): look at a
concept spec before any training.

Loads every set (a missing folder or unreadable image fails here, named), prints each set's
count and image size, writes a montage PNG per set to ``--out``, and with ``--model`` fits each
concept-vs-negative CAV at each ``--layers`` entry and prints its held-out accuracy, marking
those under the training gate. Examples::

    python -m cdistill.concepts check concepts/color_mnist.yaml
    python -m cdistill.concepts check concepts/color_mnist.yaml --model logs/.../seed0/base \\
        --config experiment=color_mnist/cd --layers conv1 relu1 pool1 conv2 pool2

``--config`` takes Hydra overrides of ``conf/train.yaml``: the experiment's datamodule gives
the preprocessing (size, channels, normalisation), ``model.concepts`` the terms and CAV
settings, and ``model.layer`` the default layer. With ``model.layer=auto`` (the default recipe)
and no ``--layers`` it scans every candidate and prints the layer training would choose
(:mod:`cdistill.concepts.layer_choice`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdistill.concepts.check import (
    ConceptPair,
    activation_note,
    check_pairs,
    default_layers,
    describe_sets,
    format_scan,
    scan_layers,
    term_pairs,
    write_montages,
)
from cdistill.concepts.layer_choice import MAX_IMAGES, LayerChoiceError, choose_layer
from cdistill.concepts.sets import load_spec, preprocess
from cdistill.errors import CdistillError
from cdistill.models.layers import candidate_layers, is_auto
from cdistill.models.students import first_conv
from cdistill.objective.config import CAVConfig, ConceptsConfig, ConceptTerm
from cdistill.utils.datamodule import ImageData


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m cdistill.concepts", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("check", help="load a concept spec, print its sets, write montages, scan layers")
    c.add_argument("spec", help="concept-set YAML spec")
    c.add_argument("--out", default=None, help="folder for montages and check.json (default ./concept_check/<spec name>)")
    c.add_argument("--model", default=None,
                   help="trained student: a cdistill .ckpt, a student.pt, a run folder, or a student name (with --weights)")
    c.add_argument("--weights", default=None, help="weights file for a student name given as --model")
    c.add_argument("--student", default=None, help="student name for a plain student.pt without its run beside it")
    c.add_argument("--layers", nargs="+", default=None,
                   help="candidate layers (default: model.layer; for model.layer=auto its candidates and the "
                        "layer training would choose; else the top-level modules)")
    c.add_argument("--terms", nargs="+", default=None, metavar="CONCEPT:NEGATIVE",
                   help="pairs to scan, e.g. 'color_{y}:grey' ({y}: each class; default: the config's terms, "
                        "else every set vs --negative)")
    c.add_argument("--negative", default="random", help="negative set or pool of the default pairs")
    c.add_argument("--num-classes", type=int, default=None, help="classes {y} runs over (default: the model's)")
    c.add_argument("--config", nargs="+", default=None, metavar="OVERRIDE",
                   help="Hydra overrides of conf/train.yaml, e.g. experiment=color_mnist/cd data.root=...")
    c.add_argument("--size", type=int, default=None, help="image side (default: the data's, else the spec's)")
    c.add_argument("--channels", type=int, default=None, help="image channels (default: the model's, else the spec's)")
    c.add_argument("--mean", type=float, nargs="+", default=None, help="per-channel mean of the training data, [0, 1] units")
    c.add_argument("--std", type=float, nargs="+", default=None, help="per-channel std of the training data")
    c.add_argument("--solver", default=None, help="CAV solver (default: the config's, else the default solver)")
    c.add_argument("--min-accuracy", type=float, default=None, help="gate (default: the config's, else 0.7)")
    c.add_argument("--max-images", type=int, default=64, help="images per montage")
    return p


def compose_config(overrides: Sequence[str]) -> Any:
    """``conf/train.yaml`` composed with ``overrides`` (Hydra's compose API, no run directory)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cdistill.cli.train import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def parse_pairs(texts: Sequence[str]) -> list[ConceptTerm]:
    """``CONCEPT:NEGATIVE`` (or ``CONCEPT``, negative ``random``) -> concept terms."""
    terms = []
    for text in texts:
        concept, _, negative = text.partition(":")
        if not concept:
            raise CdistillError(f"--terms {text!r}: give CONCEPT:NEGATIVE, e.g. 'color_{{y}}:grey'.")
        terms.append(ConceptTerm(concept=concept, negative=negative or "random"))
    return terms


def default_pairs(set_names: Sequence[str], negative: str) -> list[ConceptPair]:
    """Every set outside a pool, except the negative, vs ``negative``."""
    singles = [s for s in set_names if "/" not in s and s != negative]
    return [ConceptPair(s, negative, s) for s in singles]


def _datamodule(cfg: Any) -> Any:
    """The experiment's datamodule, set up for ``fit`` (None without ``--config`` data)."""
    if cfg is None or "data" not in cfg:
        return None
    from cdistill.cli.train import instantiate

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    return datamodule


def _load_model(args: argparse.Namespace, cfg: Any, datamodule: Any) -> Any:
    """The ``--model`` student (:func:`cdistill.models.load.load_student`; its notes printed),
    or None without one."""
    if not args.model:
        return None
    from omegaconf import OmegaConf

    from cdistill.models.load import load_student

    size_hint = args.size or (datamodule.image_size if datamodule is not None else None)
    arch = OmegaConf.to_container(cfg.model.student, resolve=True) if cfg is not None and "student" in cfg.model else None
    loaded = load_student(args.model, name=args.student, weights=args.weights, image_size=size_hint,
                          num_classes=args.num_classes, architecture={str(k): v for k, v in arch.items()} if isinstance(arch, dict) else None)
    for note in loaded.notes:
        print(f"note: {note}")
    return loaded


def _describe(args: argparse.Namespace, sets: dict[str, Tensor], out: Path) -> dict[str, Any]:
    """Print each set's count and size, write the montages; the report's first entries."""
    infos = describe_sets(sets)
    print(f"concept spec {args.spec}: {len(sets)} sets")
    width = max(len(i.name) for i in infos) + 2
    for i in infos:
        print(f"  {i.name:<{width}}{i.count:>6} images  {i.channels}x{i.height}x{i.width}")
    montages = write_montages(sets, out, args.max_images)
    print(f"montages: {out}/ ({len(montages)} PNG)")
    return {"spec": str(args.spec), "sets": [asdict(i) for i in infos], "montages": [str(p) for p in montages]}


def _pairs(args: argparse.Namespace, sets: dict[str, Tensor], concepts_cfg: ConceptsConfig | None,
           num_classes: int) -> list[ConceptPair]:
    """The pairs to scan (``--terms``, else the config's terms, else every set vs ``--negative``),
    checked against the sets and printed."""
    if args.terms:
        pairs = term_pairs(parse_pairs(args.terms), num_classes)
    elif concepts_cfg is not None and concepts_cfg.terms:
        pairs = term_pairs(concepts_cfg.terms, num_classes)
    else:
        pairs = default_pairs(list(sets), args.negative)
    check_pairs(pairs, list(sets), str(args.spec), where="the terms" if args.terms or concepts_cfg else "--negative")
    print(f"pairs: {', '.join(f'{p.concept} vs {p.negative}' for p in pairs)} (every set exists)")
    return pairs


def _cav_config(args: argparse.Namespace, concepts_cfg: ConceptsConfig | None) -> CAVConfig:
    """The config's CAV settings (else the defaults) with ``--solver`` / ``--min-accuracy``."""
    cav = concepts_cfg.cav if concepts_cfg is not None else CAVConfig()
    overrides = {k: v for k, v in (("solver", args.solver), ("min_accuracy", args.min_accuracy)) if v is not None}
    return CAVConfig(**{**asdict(cav), **overrides}) if overrides else cav


def _auto_choice(args: argparse.Namespace, model: torch.nn.Module, inputs: dict[str, Tensor], blank: Tensor,
                 concepts_cfg: ConceptsConfig | None, num_classes: int, cav: CAVConfig) -> dict[str, Any]:
    """What training would choose (cdistill/concepts/layer_choice.py), every candidate scored:
    printed, and the report's ``auto`` entry."""
    terms = parse_pairs(args.terms) if args.terms else (concepts_cfg.terms if concepts_cfg is not None else ())
    capped = {k: v[:MAX_IMAGES] for k, v in inputs.items()}
    try:
        choice = choose_layer(model, capped, terms, num_classes, cav, blank=blank, scan_all=True)
    except LayerChoiceError as err:
        print(str(err))
        return {"error": str(err)}
    print(choice.summary())
    return choice.to_dict()


def run_check(args: argparse.Namespace) -> dict[str, Any]:
    """Do what ``check`` prints (see the module docstring); return what ``check.json`` holds."""
    cfg = compose_config(args.config) if args.config else None
    datamodule = _datamodule(cfg)
    loaded = _load_model(args, cfg, datamodule)
    conv = first_conv(loaded.model) if loaded is not None else None
    channels = args.channels or (conv.in_channels if conv is not None else None) or (
        datamodule.num_channels if datamodule is not None else None)
    size = args.size or (datamodule.image_size if datamodule is not None else None) or (
        getattr(loaded.model, "image_size", None) if loaded is not None else None)
    sets = load_spec(args.spec, channels=channels, size=size)
    out = Path(args.out) if args.out else Path.cwd() / "concept_check" / Path(args.spec).stem
    report = _describe(args, sets, out)
    concepts_cfg = ConceptsConfig.from_dict(dict(cfg.model.concepts)) if cfg is not None and "concepts" in cfg.model else None
    num_classes = args.num_classes or (loaded.student.get("num_classes") if loaded is not None else None) or (
        datamodule.num_classes if datamodule is not None else 10)
    pairs = _pairs(args, sets, concepts_cfg, int(num_classes))
    if loaded is None:
        print("no --model: CAV accuracies not scanned (they need a trained student, e.g. the pipeline's base model)")
        _write(out, report)
        return report
    model = loaded.model
    auto = not args.layers and cfg is not None and is_auto(cfg.model.get("layer"))
    layers = args.layers or (candidate_layers(model) if auto else [str(cfg.model.layer)] if cfg is not None and cfg.model.get("layer")
                             else default_layers(model))
    print(activation_note(model))
    mean, std = _stats(args, loaded, datamodule, sets, int(channels or next(iter(sets.values())).shape[1]))
    side = int(size or next(iter(sets.values())).shape[-1])
    n_chans = int(channels or next(iter(sets.values())).shape[1])

    def normalize(x: Tensor) -> Tensor:
        return (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)

    inputs = {s: preprocess(x, normalize, channels=n_chans, size=side) for s, x in sets.items()}
    blank = preprocess(torch.zeros_like(next(iter(sets.values()))[:1]), normalize, channels=n_chans, size=side)
    cav = _cav_config(args, concepts_cfg)
    scores = scan_layers(model, inputs, pairs, layers, cav, blank=blank)
    print(f"CAV held-out accuracy ({cav.solver}, gate {cav.min_accuracy}):")
    print(format_scan(scores))
    report["scan"] = [asdict(s) for s in scores]
    report["layers"] = list(layers)
    if auto:
        report["auto"] = _auto_choice(args, model, inputs, blank, concepts_cfg, int(num_classes), cav)
    _write(out, report)
    return report


def _stats(args: argparse.Namespace, loaded: Any, datamodule: ImageData | None, sets: dict[str, Tensor], channels: int) -> tuple[Tensor, Tensor]:
    """The normalisation of the concept images: ``--mean/--std``, else the datamodule's, else
    the checkpoint's stored statistics, else the concept images' own (printed)."""
    if args.mean is not None or args.std is not None:
        if args.mean is None or args.std is None or len(args.mean) != channels or len(args.std) != channels:
            raise CdistillError(f"Give --mean and --std with {channels} values each (the model's channels).")
        return torch.tensor(args.mean), torch.tensor(args.std)
    if datamodule is not None:
        return datamodule.mean.float(), datamodule.std.float()
    if loaded.input_mean is not None and loaded.input_mean.numel() == channels and bool((loaded.input_std > 0).all()) \
            and not bool((loaded.input_std == 1).all() and (loaded.input_mean == 0).all()):
        print("normalisation: the training data's statistics stored in the checkpoint")
        return loaded.input_mean, loaded.input_std
    # [C, pixels of every image of every set]
    pixels = torch.cat([x.float().transpose(0, 1).reshape(x.shape[1], -1) for x in sets.values()], dim=1) / 255.0
    mean, std = pixels.mean(1), pixels.std(1).clamp_min(1e-6)
    print("normalisation: the concept images' own statistics (give --config or --mean/--std for the training data's)")
    return mean, std


def _write(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "check.json").write_text(json.dumps(report, indent=2))
    print(f"written: {out / 'check.json'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; a :class:`CdistillError` prints its message alone and returns 1."""
    args = _parser().parse_args(argv)
    try:
        run_check(args)
    except CdistillError as err:
        sys.stderr.write(f"Error: {err}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
