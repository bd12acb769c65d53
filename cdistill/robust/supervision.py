"""What each debiasing method needs besides the training labels: its *supervision*.

The comparison table prints it next to each method, so that a reader sees what a method costs
in annotation, not only what it scores. Four kinds (plus ``input masks`` for RRR, which reads a
per-image foreground mask):

* ``none``: training labels only (ERM, class-balanced sampling, LfF);
* ``concept images``: a few example images of the cue (cdistill's concept methods, RR-ClArC);
* ``val group labels``: ``(label, bias)`` on a held-out validation set only (JTT tunes on it, DFR
  retrains the last layer on it);
* ``train group labels``: the bias attribute of every training sample (group reweighting or
  balanced sampling, GroupDRO; and the erasure methods as configured in ``conf/erasure``, which
  fit the eraser on the training images' ``bias`` key, not on concept images).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

from cdistill.errors import unknown_name

Supervision = Literal["none", "concept images", "val group labels", "train group labels", "input masks"]
SUPERVISIONS: tuple[str, ...] = get_args(Supervision)

#: Method name (a ``method=`` config, or the experiment name of a concept method) -> supervision.
METHOD_SUPERVISION: dict[str, Supervision] = {
    "erm": "none",
    "class_balanced": "none",
    "lff": "none",
    "group_balanced": "train group labels",
    "reweight": "train group labels",
    "group_dro": "train group labels",
    "jtt": "val group labels",
    "dfr": "val group labels",
    "cd": "concept images",
    "cd_best": "concept images",
    "cd_gradient": "concept images",
    "leace": "train group labels",
    "rlace": "train group labels",
    "inlp": "train group labels",
    "pclarc": "train group labels",
    "rrclarc": "concept images",
    "adv_probe": "concept images",
    "rrr": "input masks",
}


def method_supervision(name: str) -> Supervision:
    """The supervision of a method by name (:data:`METHOD_SUPERVISION`).

    Raises:
        CdistillError: An unknown name (close names listed).
    """
    if name not in METHOD_SUPERVISION:
        raise unknown_name("method", name, METHOD_SUPERVISION, "Add it to cdistill.robust.supervision.METHOD_SUPERVISION.")
    return METHOD_SUPERVISION[name]


def supervision_of(cfg: Mapping[str, Any]) -> Supervision:
    """The supervision a composed run config uses: its task class's ``supervision`` attribute,
    raised to ``train group labels`` by ``data.sampler=group_balanced``.

    Args:
        cfg: The run config (``model._target_``, optionally ``data.sampler``).
    """
    import hydra.utils

    cls = hydra.utils.get_class(str(cfg["model"]["_target_"]))
    own: Supervision = getattr(cls, "supervision", "none")
    data = cfg.get("data") or {}
    if data.get("sampler") == "group_balanced":
        return "train group labels"
    return own
