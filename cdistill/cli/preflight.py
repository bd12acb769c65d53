"""The pipeline's checks before any training (``pipeline.dry_run=true`` stops after them).

Every check here fails with one :class:`~cdistill.errors.CdistillError` that names the thing
and the fix, in seconds, where the pipeline would otherwise fail after base training:

- the trainer stops, the protocols parse, the datamodule builds and reads its data;
- the concept-distillation module builds (the layer path exists, listing close names; the
  terms and CAV settings parse; the erasers' layers exist);
- the student takes the data's channels and image size;
- the concept spec loads every set at the data's size and channels, every term's concept and
  negative exist (``{y}`` expanded per class), and the TCAV concept, random pool and layer exist;
- one forward pass of concept images reaches the layer;
- with a base model (``pipeline.base_ckpt``): the file loads (``weights_only=True``) into the
  student, and the CAVs are fitted on it exactly as the concept-distillation stage fits them,
  so a gate failure (every CAV under ``model.concepts.min_accuracy``) shows here; with
  ``model.layer=auto`` that is the layer choice's scan (no candidate passing fails here).

Without a base model the CAV gate cannot be checked: its accuracies depend on the trained base
model. ``python -m cdistill.concepts check SPEC --model <base> --layers ...`` scans layers once
one exists.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, open_dict

from cdistill.cli.train import check_trainer_limits, instantiate, protocol_metric
from cdistill.concepts import load_spec, preprocess
from cdistill.concepts.check import ConceptPair, check_pairs, scan_layers, term_pairs
from cdistill.concepts.layer_choice import MAX_IMAGES, choose_layer
from cdistill.errors import CdistillError
from cdistill.models.layers import candidate_layers, is_auto, resolve_layer
from cdistill.models.load import resolve_weights
from cdistill.models.students import check_input_channels, check_input_size
from cdistill.objective.cav_fitter import CAVGateError
from cdistill.objective.config import ConceptTerm
from cdistill.utils.capture import collect_activations, resolve_module


def base_checkpoint(cfg: DictConfig, seed: int | None = None) -> str | None:
    """The file ``pipeline.base_ckpt`` names for ``seed`` (``{seed}`` in the path is replaced):
    a student weights file (a run's ``student.pt``), a cdistill ``.ckpt``, a run directory (its
    ``student.pt``, else ``checkpoints/last.ckpt``), or an earlier pipeline run's directory
    (its ``seed<seed>/base``); None when not set.

    Raises:
        CdistillError: The path does not exist, or the folder holds neither file.
    """
    raw = cfg.pipeline.get("base_ckpt")
    if not raw:
        return None
    seed = int(seed if seed is not None else cfg.pipeline.seeds[0])
    path = Path(str(raw).replace("{seed}", str(seed))).expanduser()
    runs = sorted(p.parent.name for p in path.glob("seed*/base") if p.is_dir()) if path.is_dir() else []
    if runs:  # an earlier pipeline run's directory: this seed's base model
        if f"seed{seed}" not in runs:
            raise CdistillError(f"pipeline.base_ckpt={str(path)!r} is a pipeline run without seed{seed}/base (it has "
                                f"{runs}). Train that seed's base model, or set pipeline.seeds to the seeds it has.")
        path = path / f"seed{seed}" / "base"
    return str(resolve_weights(path, "pipeline.base_ckpt"))


def _model_config(cfg: DictConfig, base_ckpt: str | None) -> DictConfig:
    model = cfg.model.copy()
    with open_dict(model):
        model.student.checkpoint_path = base_ckpt
    return model


def _check_trainer(cfg: DictConfig) -> str:
    check_trainer_limits(cfg.trainer)
    for name, spec in dict(cfg.get("protocols") or {}).items():
        protocol_metric(name, spec)
    return f"trainer stops; protocols {list(cfg.get('protocols') or ['last'])} parse"


def _check_data(cfg: DictConfig) -> tuple[Any, str]:
    """The datamodule, set up for ``fit``, and its line."""
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    sizes = ", ".join(f"{n} {len(datamodule.split(n))}" for n in ["train", *datamodule.val_names, *datamodule.test_names])
    return datamodule, f"data {cfg.data._target_}: {sizes}; {datamodule.num_channels}x{datamodule.image_size}x{datamodule.image_size}"


def _check_model(cfg: DictConfig, datamodule: Any, base_ckpt: str | None, done: list[str]) -> tuple[Any, str]:
    """The concept-distillation module (on the base model when given) and its layer (the stem
    for ``auto``); its lines appended to ``done``."""
    # Builds the student (loading the base model when given) and checks the layer, terms, erasers.
    module = instantiate(_model_config(cfg, base_ckpt))
    student = module.student
    name = str(cfg.model.student.name)
    check_input_channels(student, datamodule.num_channels, name)
    if isinstance(getattr(student, "image_size", None), int):
        check_input_size(student, int(datamodule.image_size), name)
    layer = resolve_layer(student, str(cfg.model.layer))  # auto: the stem until the base model is scanned below
    done.append(f"model {cfg.model._target_}: student {name} takes the data's images; layer {layer!r} exists")
    if base_ckpt:
        done.append(f"base model {base_ckpt} loads into {name} (weights_only=True)")
    return module, layer


def _check_tcav(cfg: DictConfig, sets: Mapping[str, Any], spec: str, student: torch.nn.Module, layer: str) -> str:
    tc = cfg.pipeline.tcav
    tcav_pairs = term_pairs([ConceptTerm(concept=str(tc.concept), negative=str(tc.random))], int(cfg.model.num_classes))
    check_pairs(tcav_pairs, list(sets), spec, where="pipeline.tcav.concept / pipeline.tcav.random")
    pool = [k for k in sets if k.startswith(f"{tc.random}/")]
    if len(pool) < 2:
        raise CdistillError(f"pipeline.tcav.random={tc.random!r}: the concept spec {spec!r} needs it as a pool "
                            "split into >= 2 sets (e.g. `random: {kind: noise, n: 500, split: 10}`).")
    tcav_layer = resolve_layer(student, str(tc.get("layer") or layer))
    try:
        resolve_module(student, tcav_layer)
    except CdistillError as err:
        raise CdistillError(f"pipeline.tcav.layer: {err}") from None
    return (f"TCAV: {len(tcav_pairs)} concepts and the {len(pool)}-set pool {tc.random!r} exist; "
            f"layer {tcav_layer!r} exists")


def _check_layer_choice(cfg: DictConfig, module: Any, inputs: dict[str, torch.Tensor], layer: str,
                        blank: torch.Tensor, base_ckpt: str | None, done: list[str]) -> str:
    """The layer the CAVs are fitted at: with ``model.layer=auto`` and a base model, the layer
    choice's scan (its summary appended to ``done``); ``layer`` otherwise."""
    if not (is_auto(cfg.model.layer) and module.concepts_cfg.terms):
        return layer
    if base_ckpt:  # the CAV scan the training run will do (cdistill/concepts/layer_choice.py)
        capped = {k: v[:MAX_IMAGES] for k, v in inputs.items()}
        choice = choose_layer(module.student, capped, module.concepts_cfg.terms, int(cfg.model.num_classes),
                              module.concepts_cfg.cav, blank=blank)
        done.append(choice.summary())
        return choice.layer
    done.append(f"model.layer=auto: chosen after base training from the base model's CAV scan among "
                f"{candidate_layers(module.student)}; the stem {layer!r} is checked here")
    return layer


def preflight(cfg: DictConfig) -> list[str]:
    """Run the checks (see the module docstring) for the first seed; return one line per check.

    Raises:
        CdistillError: The first check that fails (a :class:`CAVGateError` for the gate).
    """
    done = [_check_trainer(cfg)]
    base_ckpt = base_checkpoint(cfg)
    if base_ckpt:
        for seed in cfg.pipeline.seeds:
            base_checkpoint(cfg, int(seed))
    datamodule, line = _check_data(cfg)
    done.append(line)
    module, layer = _check_model(cfg, datamodule, base_ckpt, done)
    spec = str(cfg.model.concepts.spec)
    sets = load_spec(spec, channels=datamodule.num_channels, size=datamodule.image_size)
    done.append(f"concept spec {spec}: {len(sets)} sets load ({', '.join(f'{k} {len(v)}' for k, v in list(sets.items())[:4])}"
                f"{' ...' if len(sets) > 4 else ''})")
    pairs = term_pairs(module.concepts_cfg.terms, int(cfg.model.num_classes))
    check_pairs(pairs, list(sets), spec)
    if pairs:
        done.append(f"terms: {len(pairs)} concept/negative pairs exist ({pairs[0].concept} vs {pairs[0].negative} ...)")
    if cfg.pipeline.tcav.enabled:
        done.append(_check_tcav(cfg, sets, spec, module.student, layer))
    kw = {"channels": datamodule.num_channels, "size": datamodule.image_size}
    inputs = {k: preprocess(v, datamodule.normalize, **kw) for k, v in sets.items()}
    blank = preprocess(torch.zeros_like(next(iter(sets.values()))[:1]), datamodule.normalize, **kw)
    act = collect_activations(module.student, layer, [next(iter(inputs.values()))[:2]], flatten=False)
    done.append(f"concept images reach layer {layer!r}: activations {tuple(act.shape[1:])}")
    layer = _check_layer_choice(cfg, module, inputs, layer, blank, base_ckpt, done)
    if base_ckpt and module.needs_cavs and pairs:  # λ_c's CAVs (concept vs negative), at the chosen layer too
        done.append(gate_check(module, inputs, pairs, layer, blank))
    elif module.needs_cavs:
        done.append("CAV gate: not checked (it needs the trained base model: give pipeline.base_ckpt=<base run>, "
                    "or after base training run `python -m cdistill.concepts check SPEC --model <base> --layers ...`)")
    return done


def gate_check(module: Any, inputs: dict[str, torch.Tensor], pairs: list[ConceptPair], layer: str,
               blank: torch.Tensor | None = None) -> str:
    """Fit the CAVs on the base model as the concept-distillation stage will (the same rows,
    solver, held-out split and gate, via :func:`~cdistill.concepts.check.scan_layers`); raise
    :class:`CAVGateError` when every one is under the gate, with each pair's accuracy.

    Student-space CAVs only: with a teacher whose ``cav_space`` is ``teacher`` the stage gates
    the mapped teacher's CAVs, which need the teacher stage (not run here)."""
    cav = module.concepts_cfg.cav
    scores = scan_layers(module.student, inputs, pairs, [layer], cav, blank=blank)
    accs = ", ".join(f"{s.concept} vs {s.negative} {s.accuracy:.3f}" for s in scores)
    if not any(s.passes for s in scores):
        raise CAVGateError(
            f"Every CAV at {layer!r} on the base model is under the gate model.concepts.min_accuracy="
            f"{cav.min_accuracy} ({accs}): concept distillation would stop right after base training. Compare "
            "layers with `python -m cdistill.concepts check <spec> --model <base> --layers ...` and set model.layer."
        )
    passed = sum(s.passes for s in scores)
    return f"CAV gate on the base model at {layer!r}: {passed}/{len(scores)} pairs pass {cav.min_accuracy} ({accs})"


def reuse_config(base: DictConfig, ckpt: str) -> DictConfig:
    """The base stage's config turned into a test of an existing base model: its weights from
    ``ckpt``, no training (every protocol tests those weights)."""
    out = base.copy()
    with open_dict(out):
        out.model.student.checkpoint_path = ckpt
        out.train = False
        out.test = True
    return out


def dry_run_report(lines: list[str], out: Path) -> str:
    """Write ``dry_run.txt`` in the run directory; return its text."""
    text = "pipeline dry run: every check passed\n" + "\n".join(f"  ok  {line}" for line in lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "dry_run.txt").write_text(text)
    return text

