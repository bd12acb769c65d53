"""The machinery every typed config shares: building from a plain dict, writing back, checks.

A config is a frozen dataclass that mixes in :class:`PlainConfig`: ``from_dict`` reads the
YAML form (``null`` means the field's default; an unknown key is named with close names),
``to_dict`` writes plain dicts and lists (Lightning ``hparams``, checkpoints loaded with
``weights_only=True``), so ``from_dict(to_dict(c)) == c``. A class whose YAML form differs from
its fields (a schedule's ``<what>_every_n_steps`` keys, a tuple given as a list) overrides
:meth:`PlainConfig._prepare` and, where needed, ``to_dict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

from cdistill.errors import CdistillError, unknown_name

C = TypeVar("C")
P = TypeVar("P", bound="PlainConfig")


def build(cls: type[C], values: Mapping[str, Any], where: str) -> C:
    """``cls(**values)``, with an unknown key named (and close names listed) instead of a TypeError."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    for key in values:
        if key not in names:
            raise unknown_name(f"key of {where}", str(key), names, f"Remove {where}.{key} or fix its name.")
    return cls(**values)


def without_nulls(cfg: Mapping[Any, Any] | None) -> dict[str, Any]:
    """The keys of ``cfg`` whose value is not ``null`` (a null YAML value means the default)."""
    return {str(k): v for k, v in (cfg or {}).items() if v is not None}


def plain(value: Any) -> Any:
    """Tuples (and nested ones) as lists, mappings (an OmegaConf node too, resolved) as dicts:
    what YAML and ``weights_only`` hold."""
    if isinstance(value, DictConfig | ListConfig):
        # Resolved and read whole: a mandatory ``???`` stays a string for the config to name.
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


def check_choice(where: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse ``value`` outside ``choices``, naming the key ``where``."""
    if value not in choices:
        raise CdistillError(f"{where}={value!r}: use one of {choices}.")


def check_positive(where: str, value: Any, integer: bool = False, allow_zero: bool = False) -> None:
    """Refuse a value that is not a number (a whole one with ``integer``) > 0 (>= 0 with ``allow_zero``)."""
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or not (value >= 0 if allow_zero else value > 0):
        kind = "a whole number" if integer else "a number"
        raise CdistillError(f"{where}={value!r}: use {kind} {'>= 0' if allow_zero else '> 0'}.")


class PlainConfig:
    """Mixin of the typed configs: ``from_dict`` / ``to_dict`` through plain dicts.

    A subclass is a frozen dataclass and sets ``where``, the config key it is read from (for
    messages, e.g. ``model.outputs``), and ``choices``, the allowed values of its fields that
    take one of a few names (checked when it is built; a subclass with checks of its own
    calls ``super().__post_init__()``).
    """

    where: ClassVar[str] = "the config"
    choices: ClassVar[Mapping[str, tuple[str, ...]]] = {}

    def __post_init__(self) -> None:
        for key, allowed in self.choices.items():
            check_choice(f"{self.where}.{key}", getattr(self, key), allowed)

    @classmethod
    def _prepare(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Turn the YAML form (nulls dropped) into field values; the default takes them as they are."""
        return values

    @classmethod
    def from_dict(cls: type[P], cfg: Mapping[str, Any] | None) -> P:
        """Parse the YAML form; ``None`` or a missing key: the field's default."""
        return build(cls, cls._prepare(without_nulls(cfg)), cls.where)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain dicts and lists (``from_dict`` reads it back to an equal config)."""
        out: dict[str, Any] = plain(dataclasses.asdict(self))  # type: ignore[call-overload]
        return out


@dataclass(frozen=True)
class Every:
    """A schedule: every ``steps`` optimiser steps and/or every ``epochs`` epochs (0: never).

    Args:
        steps: Due after global step ``n · steps`` (``n >= 1``).
        epochs: Due at epoch ``n · epochs`` (``n >= 1``; the caller says whether at its start
            or after its last batch).
    """

    steps: int = 0
    epochs: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "epochs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CdistillError(f"A schedule's every_n_{key}={value!r}: use a whole number >= 0 (0: never).")

    @property
    def active(self) -> bool:
        return self.steps > 0 or self.epochs > 0

    def step_due(self, step: int) -> bool:
        """Due after global step ``step`` (never at step 0)."""
        return self.steps > 0 and step > 0 and step % self.steps == 0

    def epoch_due(self, epoch: int) -> bool:
        """Due at epoch ``epoch`` (never at epoch 0)."""
        return self.epochs > 0 and epoch > 0 and epoch % self.epochs == 0

    @classmethod
    def pop(cls, cfg: dict[str, Any], *prefixes: str) -> Every:
        """Take ``<prefix>_every_n_steps`` / ``<prefix>_every_n_epochs`` (the first prefix
        that has a key wins; absent or null: 0) out of ``cfg``; every prefix's keys are removed."""
        found: dict[str, int] = {}
        for prefix in prefixes:
            for unit in ("steps", "epochs"):
                value = cfg.pop(f"{prefix}_every_n_{unit}", None)
                if value is not None and unit not in found:
                    found[unit] = int(value)
        return cls(**found)

    def to_keys(self, prefix: str) -> dict[str, int]:
        return {f"{prefix}_every_n_steps": self.steps, f"{prefix}_every_n_epochs": self.epochs}
