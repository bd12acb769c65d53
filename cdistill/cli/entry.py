"""The Hydra console entry points' one shape: compose ``conf/train.yaml`` with the command-line
overrides, run the task, and end on a :class:`~cdistill.errors.CdistillError` with its message
alone (:func:`~cdistill.errors.exit_on_error`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from cdistill.errors import exit_on_error
from cdistill.utils.resolvers import register_resolvers
from cdistill.utils.resources import conf_dir

register_resolvers()  # ${cdistill.run_suffix:} and ${cdistill.launch_dir:} in conf/hydra, conf/paths
CONF_DIR = conf_dir()  # the checkout's conf/, or the copy an installed wheel ships


def _discarding(task: Callable[[DictConfig], Any]) -> Callable[[DictConfig], None]:
    """``task`` returning nothing (``functools.wraps`` keeps the module Hydra reads)."""

    @functools.wraps(task)
    def run(cfg: DictConfig) -> None:
        task(cfg)

    return run


def hydra_entry(task: Callable[[DictConfig], Any], doc: str, *, objective: bool = False) -> Callable[..., Any]:
    """The console entry point of ``task``: ``main()`` reads the overrides from ``sys.argv``;
    ``main(cfg)`` runs ``task(cfg)`` on a composed config.

    Hydra names the job after the module of ``task`` (it unwraps the decorators), so each entry
    keeps its own job name and log file.

    Args:
        task: The run, e.g. :func:`cdistill.cli.pipeline.run_pipeline`.
        doc: The entry point's docstring.
        objective: Return what ``task`` returns (the sweepers' objective under ``--multirun``);
            otherwise the entry point returns None.
    """
    run = task if objective else _discarding(task)
    main = hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")(exit_on_error(run))
    main.__doc__ = doc
    return main
