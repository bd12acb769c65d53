"""``measure.reliance.layer=reliance``: measure reliance where the bias concept is *used*.

``model.layer=auto`` picks the earliest layer where the bias concept's CAVs separate (it is
*readable* there). The reliance rule (:func:`cdistill.causal.reliance_layer_scan`) picks, among
the same candidates (:func:`cdistill.concepts.layer_choice.map_candidates`), the layer where
mean-ablating the span of the bias term's CAVs moves the output most, net of a random span of
the same rank, on the same seeded inputs the reliance measure uses (``measure.reliance.split``,
``max_inputs``, ``mode``, ``seed``). Give it the base model: the choice then depends on nothing
fine-tuning did, and both models of a pair are measured at that layer.
:func:`scan_reliance_layer` runs it; :func:`write_scan` writes ``reliance_layer.json`` (every
candidate with its KLs) and a markdown table.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from cdistill.causal import RelianceLayerScan, reliance_layer_scan
from cdistill.cli.reliance_report import bias_images, cav_space, fit_bias_subspace, measure_subset
from cdistill.concepts.check import layer_rows
from cdistill.concepts.layer_choice import map_candidates
from cdistill.objective.config import ConceptsConfig
from cdistill.utils.datamodule import ImageData

log = logging.getLogger(__name__)

#: The value of ``measure.reliance.layer`` (or ``measure.tcav.layer``) that asks for the rule.
RULE = "reliance"
#: Where the scan is written (the measure's output directory).
SCAN_FILE = "reliance_layer.json"


def is_rule(spec: object) -> bool:
    """Whether a layer spec asks for the reliance layer rule."""
    return isinstance(spec, str) and spec.strip().lower() == RULE


def scan_reliance_layer(model: nn.Module, datamodule: ImageData, concepts: ConceptsConfig, num_classes: int,
                        settings: Mapping[str, Any]) -> RelianceLayerScan:
    """The reliance layer rule on ``model`` (the module docstring).

    Args:
        model: The base model (eval mode, on its device).
        datamodule: Set up; gives ``split(name)``, ``normalize``, size and channels.
        concepts: ``model.concepts`` (spec, the ``{y}`` bias term, CAV settings).
        num_classes: Classes of the task.
        settings: ``measure.reliance`` with ``split`` a list of split names (as
            :func:`~cdistill.cli.reliance_report.reliance_report` takes it).

    Returns:
        The scan: the chosen layer and every candidate's concept, control and net KL.

    Raises:
        CdistillError: No spec or bias term, no candidate outputs a map, or none can be measured.
    """
    images = bias_images(datamodule, concepts, num_classes, settings.get("concept_images"))
    layers = map_candidates(model, images.inputs[images.names[0]][:1])
    rows = layer_rows(model, images.inputs, layers, concepts.cav, blank=images.blank)  # one pass for all layers

    def subspace(layer: str) -> Tensor:
        return fit_bias_subspace(rows[layer], images, concepts.cav, layer).vectors

    scan = reliance_layer_scan(model, layers, subspace, measure_subset(datamodule, settings),
                               space=cav_space(concepts.cav), mode=str(settings["mode"]),
                               control_seed=int(settings["seed"]))
    log.info("measure.reliance.layer=reliance -> %r\n%s", scan.layer, scan.table())
    return scan


def write_scan(scan: RelianceLayerScan, out: Path) -> Path:
    """``out/reliance_layer.json`` (:meth:`RelianceLayerScan.to_dict`, with the table)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / SCAN_FILE
    path.write_text(json.dumps(scan.to_dict() | {"table": scan.table()}, indent=2))
    return path


def scan_metrics(scan: RelianceLayerScan) -> dict[str, float]:
    """Flat metrics of a scan: per candidate ``reliance_layer/net_kl/<layer>`` (and the concept
    and control KLs), and ``reliance_layer/chosen_index`` (the chosen layer's place in the
    candidates; its name is in ``reliance_layer.json``)."""
    out = {"reliance_layer/chosen_index": float([s.layer for s in scan.scores].index(scan.layer))}
    for s in scan.scores:
        out |= {f"reliance_layer/net_kl/{s.layer}": s.net_kl, f"reliance_layer/ablation_kl/{s.layer}": s.ablation_kl,
                f"reliance_layer/control_kl/{s.layer}": s.control_kl}
    return out
