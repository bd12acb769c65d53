"""Modules whose buffer shapes are data (fitted), not architecture."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn


class FittedBuffers(nn.Module):
    """Mixin: on ``load_state_dict``, buffers named in ``resizable`` adopt the checkpoint's shape
    and dtype.

    A CAV bank, prototypes or an eraser only know their size once fitted, so a freshly built
    (empty) module must be able to receive any saved one, e.g. when Lightning restores a
    checkpoint into a newly constructed LightningModule.
    """

    resizable: ClassVar[tuple[str, ...]] = ()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for name in self.resizable:
            incoming = state_dict.get(prefix + name)
            current = getattr(self, name)
            if not (isinstance(incoming, Tensor) and isinstance(current, Tensor)):
                continue
            if incoming.shape != current.shape or incoming.dtype != current.dtype:
                # Adopt the saved dtype too: a float32 eraser loaded into a float64 placeholder
                # would otherwise compute (slightly) differently from the one that was saved.
                setattr(self, name, current.new_empty(incoming.shape, dtype=incoming.dtype))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
