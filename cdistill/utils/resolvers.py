"""OmegaConf resolvers that cdistill's configs use for run directories.

``${cdistill.run_suffix:}``: a short random tag drawn once per process. Appended to the time in
``hydra.run.dir`` and ``hydra.sweep.dir`` so that two runs started in the same second write to
different folders, while every resolution inside one process (and so every DDP rank, which
Lightning restarts with the resolved ``hydra.run.dir``) agrees.

``${cdistill.launch_dir:}``: the directory the command was started from. Hydra's
``${hydra:runtime.cwd}`` is only set inside a job, so a multirun's ``hydra.sweep.dir``, which
Hydra resolves before any job starts, cannot use it.
"""

from __future__ import annotations

import os
import secrets

from omegaconf import OmegaConf

#: Drawn once per process: stable across composes, distinct between processes.
RUN_SUFFIX = secrets.token_hex(3)


def run_suffix() -> str:
    """This process's run-directory tag (6 hex digits)."""
    return RUN_SUFFIX


def launch_dir() -> str:
    """Hydra's ``runtime.cwd`` inside a job (the launch directory even if the job changed
    directory), otherwise the current directory (before a multirun starts its jobs)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.cwd)
    return os.getcwd()


def register_resolvers() -> None:
    """Register the resolvers once (importing :mod:`cdistill.cli.train` does it)."""
    for name, fn in (("cdistill.run_suffix", run_suffix), ("cdistill.launch_dir", launch_dir)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
