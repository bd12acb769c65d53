"""Typed settings of the concept objective: one home for every default.

The tasks take plain dicts (Hydra config, Lightning ``hparams``, checkpoints loaded with
``weights_only=True``) and turn them into frozen dataclasses with ``from_dict``; each class
validates itself in ``__post_init__`` (a :class:`~cdistill.errors.CdistillError` that names the
key and the fix) and writes itself back with ``to_dict``, in the YAML's own keys, so
``from_dict(to_dict(c)) == c``. A default lives in exactly one place: the field of its class
(or, for a task whose default differs, one named override such as :data:`IID_CAV`).

Schedules (CAV refresh, eraser refit, prototype refresh) are one :class:`Every`; the YAML keys
``<what>_every_n_steps`` / ``<what>_every_n_epochs`` stay the way to set it.

The classes live in :mod:`~cdistill.objective.config_base` (the shared machinery),
:mod:`~cdistill.objective.concept_config` (concept terms and CAVs),
:mod:`~cdistill.objective.term_config` (the other terms and erasure),
:mod:`~cdistill.objective.distill_config` (the distill task's whole config) and
:mod:`~cdistill.objective.robust_config` (the group-robust baselines); this module names them
all, as configs and checkpoints do.
"""

from cdistill.objective.concept_config import (
    IID_CAV,
    CAVConfig,
    ConceptsConfig,
    ConceptTerm,
    term_name,
)
from cdistill.objective.config_base import Every, PlainConfig
from cdistill.objective.distill_config import DistillConfig, ObjectiveConfig
from cdistill.objective.robust_config import (
    BALANCE_BY,
    DFRConfig,
    GroupDROConfig,
    JTTConfig,
    LfFConfig,
    ReweightConfig,
)
from cdistill.objective.term_config import (
    LOCAL_MASKS,
    CounterfactualConfig,
    ErasureConfig,
    LocalConfig,
    OutputConfig,
    ProbeConfig,
    PrototypeConfig,
    RRClArCConfig,
)

__all__ = [
    "BALANCE_BY", "IID_CAV", "LOCAL_MASKS", "CAVConfig", "ConceptTerm", "ConceptsConfig", "CounterfactualConfig",
    "DFRConfig", "DistillConfig", "ErasureConfig", "Every", "GroupDROConfig", "JTTConfig", "LfFConfig",
    "LocalConfig", "ObjectiveConfig", "OutputConfig", "PlainConfig", "ProbeConfig", "PrototypeConfig",
    "RRClArCConfig", "ReweightConfig", "term_name",
]
