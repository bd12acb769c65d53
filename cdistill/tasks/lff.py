"""LfF, Learning from Failure (Nam et al. 2020): a biased and a debiased model trained together.

The biased model ``f_B`` (a second copy of the student architecture, a submodule of the task)
trains with generalised cross-entropy, which amplifies what is easy to learn: the cue. The
debiased model ``f_D`` (the task's ``student``: what is validated, tested and saved) trains with
cross-entropy weighted per sample by the relative difficulty ``W = L_B / (L_B + L_D)``, from
exponential moving averages of both models' per-sample losses (buffers over the training
split, updated with the samples of each step, all ranks' under DDP). No group labels at all.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from cdistill.models.students import create_student
from cdistill.objective.config import LfFConfig
from cdistill.robust.dist import all_cat
from cdistill.robust.groups import train_groups
from cdistill.robust.losses import generalized_cross_entropy, relative_difficulty
from cdistill.robust.supervision import Supervision
from cdistill.tasks.classifier import Batch
from cdistill.tasks.group_robust import GroupRobustModule
from cdistill.utils.buffers import FittedBuffers
from cdistill.utils.datamodule import attached_data


class LfFModule(FittedBuffers, GroupRobustModule[LfFConfig]):
    """LfF (see the module docstring; :class:`~cdistill.objective.config.LfFConfig`).

    Buffers: ``ema_biased``, ``ema_debiased`` (``float [N]`` per training sample).
    Logs ``train/gce`` (the biased model's loss), ``train/lff_weight`` (mean ``W``) and
    ``train/task`` (the debiased model's unweighted cross-entropy).

    Args:
        lff: ``LfFConfig`` as a dict (``q``, ``ema``).
        **kwargs: :class:`~cdistill.tasks.group_robust.GroupRobustModule` arguments.
    """

    supervision: ClassVar[Supervision] = "none"
    config_class = LfFConfig
    resizable: ClassVar[tuple[str, ...]] = ("ema_biased", "ema_debiased")
    ema_biased: torch.Tensor
    ema_debiased: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        student = dict(self.hparams["student"])
        student["checkpoint_path"] = None  # the biased model starts afresh
        self.biased = create_student(**student)
        self.register_buffer("ema_biased", torch.zeros(0))
        self.register_buffer("ema_debiased", torch.zeros(0))

    def size_buffers(self, n: int) -> None:
        """Give the loss averages one slot per training sample (kept when already that size)."""
        if self.ema_biased.numel() != n:
            self.ema_biased = torch.zeros(n, device=self.device)
            self.ema_debiased = torch.zeros(n, device=self.device)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        dm = attached_data(self.trainer, self)
        self.size_buffers(len(train_groups(dm.split("train")).labels))

    def compute_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        labels = batch["label"]
        logits = self(batch["image"])
        logits_b = self.biased(batch["image"])
        ce_d = F.cross_entropy(logits, labels, reduction="none")
        ce_b = F.cross_entropy(logits_b, labels, reduction="none")
        gce = generalized_cross_entropy(logits_b, labels, self.method_cfg.q)
        index = batch["index"]
        if self.training and self.ema_biased.numel() > 0:
            # Every rank applies every rank's samples, so the averages stay identical.
            idx, lb, ld = all_cat(index), all_cat(ce_b.detach()), all_cat(ce_d.detach())
            a = self.method_cfg.ema
            self.ema_biased[idx] = a * self.ema_biased[idx] + (1 - a) * lb
            self.ema_debiased[idx] = a * self.ema_debiased[idx] + (1 - a) * ld
            weight = relative_difficulty(self.ema_biased[index], self.ema_debiased[index])
        else:
            weight = relative_difficulty(ce_b.detach(), ce_d.detach())
        loss = gce.mean() + (weight * ce_d).mean()
        return {"loss": loss, "task": ce_d.mean().detach(), "gce": gce.mean().detach(),
                "lff_weight": weight.mean(), "logits": logits}
