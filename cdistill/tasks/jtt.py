"""JTT, Just Train Twice (Liu et al. 2021), as one fit of a classification task.

When fitting starts, an identification model (a copy of the freshly built student) is trained
with plain cross-entropy for ``T = model.jtt.identify_epochs`` epochs on the training split; the
samples it then misclassifies are the *error set*. The error set is a buffer of the task
(checkpoints carry it: a resumed run does not redo stage 1) and is written to
``<run>/jtt_errors.json``. The fit itself is stage 2: the student, from its initial weights,
trains on a draw where every error appears ``λ_up = model.jtt.upweight`` times per epoch and
every other sample once (the upsampling goes through the sampler, a shuffle of that multiset
fixed by seed and epoch).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import hydra.utils
import torch
from pytorch_lightning.utilities import rank_zero_only

from cdistill.errors import CdistillError
from cdistill.objective.config import JTTConfig
from cdistill.robust.jtt import error_mask, train_identification
from cdistill.robust.sampling import SamplePlan
from cdistill.robust.supervision import Supervision
from cdistill.tasks.group_robust import GroupRobustModule
from cdistill.utils.buffers import FittedBuffers
from cdistill.utils.datamodule import attached_data

log = logging.getLogger(__name__)
#: The error set, in the run directory.
ERRORS_FILE = "jtt_errors.json"


class JTTModule(FittedBuffers, GroupRobustModule[JTTConfig]):
    """JTT (see the module docstring; :class:`~cdistill.objective.config.JTTConfig`).

    Buffers: ``jtt_errors`` (``bool [N]``, the error set over the training split) and
    ``jtt_identified`` (``bool []``).

    Args:
        jtt: ``JTTConfig`` as a dict (``identify_epochs``, ``upweight``).
        **kwargs: :class:`~cdistill.tasks.group_robust.GroupRobustModule` arguments.
    """

    supervision: ClassVar[Supervision] = "val group labels"
    config_class = JTTConfig
    resizable: ClassVar[tuple[str, ...]] = ("jtt_errors",)
    jtt_errors: torch.Tensor
    jtt_identified: torch.Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("jtt_errors", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("jtt_identified", torch.tensor(False))

    def identify(self, dataset: Any, batch_size: int, eval_batch_size: int, max_batches: int | None = None) -> torch.nn.Module:
        """Stage 1: train the identification model and store its training errors.

        Every rank runs it on the whole training split with the same generator, so all hold
        the same error set without communicating.

        Returns:
            The trained identification model.
        """
        model = copy.deepcopy(self.student)
        opt = hydra.utils.instantiate(self.hparams["optimizer"], params=model.parameters())
        seed = int(torch.randint(0, 2**62, (1,), generator=self.rng))
        gen = torch.Generator().manual_seed(seed)
        train_identification(model, dataset, opt, self.method_cfg.identify_epochs, batch_size, gen, self.device, max_batches)
        self.jtt_errors = error_mask(model, dataset, eval_batch_size, self.device).to(self.jtt_errors.device)
        self.jtt_identified.fill_(True)
        return model

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if bool(self.jtt_identified):  # restored from a checkpoint: stage 1 is done
            return
        dm = attached_data(self.trainer, self)
        train = dm.split("train")
        fdr = getattr(self.trainer, "fast_dev_run", False)
        max_batches = int(fdr) if fdr else None
        model = self.identify(train, int(dm.batch_size), int(getattr(dm, "eval_batch_size", dm.batch_size)), max_batches)
        del model
        errors = self.jtt_errors.nonzero().flatten().cpu()
        log.info("JTT: the identification model (%d epochs) misclassifies %d of %d training samples; "
                 "they are drawn %d times per epoch.", self.method_cfg.identify_epochs, errors.numel(),
                 self.jtt_errors.numel(), self.method_cfg.upweight)
        self._write_errors(errors, train)

    @rank_zero_only
    def _write_errors(self, errors: torch.Tensor, train: Any) -> None:
        out = Path(self.trainer.default_root_dir)
        out.mkdir(parents=True, exist_ok=True)
        bias = getattr(train, "bias", None)
        labels = getattr(train, "labels", None)
        conflicting = None
        if bias is not None and labels is not None:
            conflicting = int(((bias[errors] >= 0) & (bias[errors] != labels[errors])).sum())
        record = {"identify_epochs": self.method_cfg.identify_epochs, "upweight": self.method_cfg.upweight,
                  "train_size": int(self.jtt_errors.numel()), "errors": int(errors.numel()),
                  "errors_bias_conflicting": conflicting, "indices": errors.tolist()}
        (out / ERRORS_FILE).write_text(json.dumps(record))

    def train_sample_plan(self, dataset: Any) -> SamplePlan:
        """The datamodule's training draw: each error ``upweight`` times, the rest once."""
        n = len(dataset)
        if not bool(self.jtt_identified) or self.jtt_errors.numel() != n:
            raise CdistillError(
                f"JTT's error set covers {self.jtt_errors.numel()} samples but the training split has {n}: "
                "resume JTT only with the data config of the run that wrote the checkpoint."
            )
        repeats = 1 + (self.method_cfg.upweight - 1) * self.jtt_errors.long().cpu()
        return SamplePlan.from_repeats(repeats)
