"""Logger factories that need more than a plain ``_target_``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pytorch_lightning.loggers import WandbLogger


def wandb_configured() -> bool:
    """True when wandb can log online: an API key in the environment or in ``~/.netrc``."""
    if os.environ.get("WANDB_MODE", "").lower() in {"offline", "disabled", "dryrun"}:
        return False
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def wandb_logger(offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """A :class:`WandbLogger` that runs offline when no wandb key is configured.

    Args:
        offline: Force offline (True) or online (False); None decides from the environment, so
            a machine without a key never blocks on a login prompt or the network.
        **kwargs: Passed to :class:`WandbLogger` (``project``, ``name``, ``save_dir`` ...).
    """
    if offline is None:
        offline = not wandb_configured()
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    return WandbLogger(offline=offline, **kwargs)


def log_pngs(loggers: Iterable[Any], images: Mapping[str, Path], step: int) -> None:
    """Send each PNG (key -> file) to every active wandb logger (other loggers take no images)."""
    for lg in loggers:
        if type(lg).__name__ == "WandbLogger":  # by name: a subclass or a stand-in in tests also counts
            for key, png in images.items():
                lg.log_image(key=key, images=[str(png)], step=step)
