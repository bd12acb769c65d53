"""A callback that SIGKILLs its own process at a given optimiser step (tests/tasks/test_resume.py):
a real, unannounced kill at a known point mid-epoch."""

from __future__ import annotations

import os
import signal
from typing import Any

import pytorch_lightning as pl


class KillAtStep(pl.Callback):
    """SIGKILL this process after optimiser step ``step``: no hook, no cleanup, no save."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
