"""Group-robust tasks built on the classification task: the same students, datamodules,
protocols and logging as ``ClassifierModule``, another training objective.

:class:`GroupRobustModule` is their base: it refuses model keys that belong to another task,
reads the training split's groups when fitting starts (:func:`cdistill.robust.group_of`), and
declares the method's supervision. Here: group (or class) reweighting and GroupDRO; JTT, DFR and
LfF have modules of their own (``jtt.py``, ``dfr.py``, ``lff.py``).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Generic, TypeVar, cast

import torch
import torch.nn.functional as F

from cdistill.errors import CdistillError
from cdistill.objective.config import GroupDROConfig, ReweightConfig
from cdistill.objective.config_base import PlainConfig
from cdistill.robust.dist import all_sum, world_size
from cdistill.robust.groups import (
    GroupTable,
    describe_group,
    group_counts,
    group_of,
    log_absent_groups,
    train_groups,
)
from cdistill.robust.losses import dro_update, group_sums
from cdistill.robust.supervision import Supervision
from cdistill.tasks.classifier import Batch, ClassifierModule, to_plain
from cdistill.utils.datamodule import attached_data

#: The keyword arguments of the plain classification task (what a method config may carry).
CLASSIFIER_KEYS = tuple(p for p in inspect.signature(ClassifierModule.__init__).parameters if p != "self")
#: A method's settings class (e.g. :class:`~cdistill.objective.config.JTTConfig`).
M = TypeVar("M", bound=PlainConfig)


class GroupRobustModule(ClassifierModule, Generic[M]):
    """Base of the group-robust tasks (plain cross-entropy itself: ERM).

    A method with settings names their class in ``config_class`` (and, for the type checker,
    as the type argument: ``GroupRobustModule[JTTConfig]``). That class's ``where`` (e.g.
    ``model.jtt``) names the model config's section it reads, and so the method: ``method``
    is its last part (``jtt``). The base takes that keyword argument, parses it into
    ``method_cfg`` and saves it in the hyperparameters under that name, so no subclass
    repeats that ``__init__``.

    Buffers: ``train_group_counts`` (``int64 [G + 1]``: training samples per ``(label, bias)``
    group, the last slot counting samples of no group), filled when fitting starts.

    Args:
        **kwargs: :class:`~cdistill.tasks.classifier.ClassifierModule` arguments, and the
            method's settings as a dict under the key ``method`` (when it has ``config_class``).

    Raises:
        CdistillError: A model key of another task (e.g. a concept method's ``layer`` or
            ``concepts``): group-robust methods compose with ``experiment=<family>/baseline``.
    """

    supervision: ClassVar[Supervision] = "none"
    method: ClassVar[str] = "erm"
    config_class: ClassVar[type[PlainConfig] | None] = None
    method_cfg: M
    train_group_counts: torch.Tensor

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.config_class is not None:
            # One name for the method, its model config key and its hyperparameter: the config's.
            cls.method = cls.config_class.where.rsplit(".", 1)[-1]

    def __init__(self, **kwargs: Any) -> None:
        raw = kwargs.pop(self.method, None) if self.config_class is not None else None
        foreign = sorted(k for k in kwargs if k not in CLASSIFIER_KEYS)
        if foreign:
            raise CdistillError(
                f"method={self.method} trains a plain classifier with its own objective, but the model config "
                f"also has {', '.join('model.' + k for k in foreign)} (keys of another task, e.g. a concept "
                f"method's). Compose it with a baseline: experiment=<family>/baseline method={self.method}."
            )
        super().__init__(**kwargs)
        self.num_slots = int(self.hparams["num_classes"]) * int(self.hparams["num_bias_groups"]) + 1
        self.register_buffer("train_group_counts", torch.zeros(self.num_slots, dtype=torch.long))
        if self.config_class is not None:
            # The cast holds by the subclass's declaration: config_class is its type argument M.
            self.method_cfg = cast(M, self.config_class.from_dict(to_plain(raw)))
            self.save_hyperparameters({self.method: self.method_cfg.to_dict()})

    # ------------------------------------------------------------------ groups
    def slots(self, labels: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``int64 [B]`` group slot of each sample: its group, or the last slot for no group."""
        g = group_of(labels, bias, int(self.hparams["num_bias_groups"]))
        return torch.where(g < 0, torch.full_like(g, self.num_slots - 1), g)

    def adopt_train_groups(self, table: GroupTable) -> None:
        """Count the training split's groups (callable without a Trainer, e.g. in tests)."""
        n_bias = int(self.hparams["num_bias_groups"])
        if bool((table.bias >= n_bias).any()) or bool((table.labels >= self.hparams["num_classes"]).any()):
            raise CdistillError(
                f"The training split has labels up to {int(table.labels.max())} and bias values up to "
                f"{int(table.bias.max())}, beyond model.num_classes={self.hparams['num_classes']} / "
                f"model.num_bias_groups={n_bias}: set them to match the data."
            )
        slots = self.slots(table.labels, table.bias)
        self.train_group_counts.copy_(group_counts(slots, self.num_slots).to(self.train_group_counts))

    def on_fit_start(self) -> None:
        dm = attached_data(self.trainer, self)
        self.adopt_train_groups(train_groups(dm.split("train")))


class ReweightModule(GroupRobustModule[ReweightConfig]):
    """Cross-entropy with each sample weighted by the inverse frequency of its group (or class)
    in the training split (:class:`~cdistill.objective.config.ReweightConfig`): every present
    group carries the same total weight. Absent groups cannot be weighted (a log line says so).

    Args:
        reweight: ``ReweightConfig`` as a dict (``by``: ``group`` or ``class``).
        **kwargs: :class:`GroupRobustModule` arguments.
    """

    supervision: ClassVar[Supervision] = "train group labels"
    config_class = ReweightConfig
    key_weights: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        keys = self.num_slots if self.method_cfg.by == "group" else int(self.hparams["num_classes"])
        self.register_buffer("key_weights", torch.zeros(keys))

    def keys(self, labels: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.slots(labels, bias) if self.method_cfg.by == "group" else labels

    def adopt_train_groups(self, table: GroupTable) -> None:
        super().adopt_train_groups(table)
        if self.method_cfg.by == "group":
            log_absent_groups(self.train_group_counts[:-1], int(self.hparams["num_bias_groups"]), "reweight")
        counts = torch.bincount(self.keys(table.labels, table.bias), minlength=self.key_weights.numel()).double()
        present = counts > 0
        weights = torch.where(present, counts.sum() / (present.sum() * counts.clamp_min(1)), torch.zeros_like(counts))
        self.key_weights.copy_(weights.to(self.key_weights))

    def compute_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        logits = self(batch["image"])
        ce = F.cross_entropy(logits, batch["label"], reduction="none")
        w = self.key_weights[self.keys(batch["label"], batch["bias"])]
        loss = (w * ce).mean()
        return {"loss": loss, "task": ce.mean().detach(), "logits": logits}


class GroupDROModule(GroupRobustModule[GroupDROConfig]):
    """Online GroupDRO (Sagawa et al. 2020; :class:`~cdistill.objective.config.GroupDROConfig`).

    Each step, the group weights ``q`` (a buffer: checkpoints carry them, a resumed run continues
    them exactly) take one exponentiated step towards the groups with the highest loss in the
    batch, ``q_g <- q_g exp(η ℓ_g)`` normalised, and the student minimises ``Σ_g q_g ℓ_g``. Under
    DDP the group losses are summed over the ranks before the update, so every rank holds the
    same ``q`` and the step equals one process's with the global batch. Strong L2 comes from the
    optimizer's ``weight_decay`` (``method=group_dro`` sets it). ``q`` starts uniform over the
    groups present in the training split; the others stay at 0 (a log line names them).

    Logs ``dro/q_y<label>_b<bias>`` per present group at each epoch end, and ``dro/q_max``.

    Args:
        group_dro: ``GroupDROConfig`` as a dict (``eta``, ``adjustment``).
        **kwargs: :class:`GroupRobustModule` arguments.
    """

    supervision: ClassVar[Supervision] = "train group labels"
    config_class = GroupDROConfig
    group_weights: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("group_weights", torch.zeros(self.num_slots))

    def adopt_train_groups(self, table: GroupTable) -> None:
        super().adopt_train_groups(table)
        log_absent_groups(self.train_group_counts[:-1], int(self.hparams["num_bias_groups"]), "group_dro")
        if float(self.group_weights.sum()) == 0:  # a resumed run keeps the checkpoint's weights
            present = (self.train_group_counts > 0).to(self.group_weights)
            self.group_weights.copy_(present / present.sum())

    def compute_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        if float(self.group_weights.sum()) == 0:
            raise CdistillError("GroupDROModule: the group weights are not set; call adopt_train_groups first.")
        logits = self(batch["image"])
        ce = F.cross_entropy(logits, batch["label"], reduction="none")
        sums, counts = group_sums(ce, self.slots(batch["label"], batch["bias"]), self.num_slots)
        global_sums, global_counts = all_sum(sums), all_sum(counts)
        present = global_counts > 0
        group_loss = global_sums / global_counts.clamp_min(1)  # [G+1] detached, the global batch's
        if self.training:
            adjusted = group_loss
            if self.method_cfg.adjustment > 0:
                adjusted = group_loss + self.method_cfg.adjustment / self.train_group_counts.clamp_min(1).to(ce).sqrt()
            self.group_weights.copy_(dro_update(self.group_weights, adjusted, present, self.method_cfg.eta))
        # This rank's share of Σ_g q_g · (global group sum / global group count); DDP averages
        # the ranks' gradients, hence the factor world_size.
        loss = world_size() * (self.group_weights * sums / global_counts.clamp_min(1)).sum()
        return {"loss": loss, "task": ce.mean().detach(), "logits": logits}

    def on_train_epoch_end(self) -> None:
        n_bias = int(self.hparams["num_bias_groups"])
        values = {}
        for g in (self.train_group_counts > 0).nonzero().flatten().tolist():
            name = "none" if g == self.num_slots - 1 else f"y{g // n_bias}_b{g % n_bias}"
            values[f"dro/q_{name}"] = self.group_weights[g]
        values["dro/q_max"] = self.group_weights.max()
        self.log_dict(values, on_step=False, on_epoch=True)

    def group_weight_table(self) -> dict[str, float]:
        """``{"(label 3, bias 7)": q, ...}`` of the present groups (for reports)."""
        n_bias = int(self.hparams["num_bias_groups"])
        return {describe_group(g if g < self.num_slots - 1 else -1, n_bias): float(self.group_weights[g])
                for g in (self.train_group_counts > 0).nonzero().flatten().tolist()}
