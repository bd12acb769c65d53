"""Re-iterable input batches for the causal basis extraction, streamed onto the model's device.

The extraction passes over the inputs many times (once per L-BFGS function evaluation) and
compares each pass with the unmodified outputs of the first one, so every pass must yield
the same batches in the same order. A cheap fingerprint per batch (its shape and float64 sum)
catches a shuffling loader or random augmentation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from cdistill.errors import CdistillError

_FIX = (
    "Pass a tensor [N, ...], a list of batches, or a DataLoader without shuffling or random "
    "augmentation."
)


def _input_of(batch: Any) -> Tensor:
    """The input tensor of a batch: the tensor itself, ``batch["image"]`` or ``batch[0]``."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        if "image" not in batch:
            raise CdistillError(
                f"A batch is a mapping without an 'image' key (keys: {', '.join(map(str, batch))}). "
                "Yield tensors, (x, y) tuples, or mappings with the input under 'image'."
            )
        return _input_of(batch["image"])
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
        return _input_of(batch[0])
    raise CdistillError(
        f"A batch is a {type(batch).__name__}, not a tensor, an (x, y) tuple or a mapping "
        "with 'image'. " + _FIX
    )


class InputBatches:
    """Yield the input batches on ``device``, the same ones on every pass.

    Args:
        inputs: A tensor ``[N, ...]`` (one batch) or a re-iterable of batches (tensors,
            ``(x, y)`` tuples or mappings with ``"image"``).
        device: Where the model lives.

    Raises:
        CdistillError: ``inputs`` is a one-shot iterator, or (during iteration) a later pass
            yields different batches than the first.
    """

    def __init__(self, inputs: Tensor | Iterable[Any], device: torch.device) -> None:
        if not isinstance(inputs, Tensor) and iter(inputs) is inputs:
            raise CdistillError(
                "The inputs are a one-shot iterator (e.g. a generator), but the extraction "
                "passes over them many times. " + _FIX
            )
        self._inputs = inputs
        self._device = device
        self._prints: list[tuple[tuple[int, ...], Tensor]] | None = None

    def __iter__(self) -> Iterator[Tensor]:
        source: Iterable[Any] = [self._inputs] if isinstance(self._inputs, Tensor) else self._inputs
        first = self._prints is None
        prints: list[tuple[tuple[int, ...], Tensor]] = []
        count = 0
        for batch in source:
            x = _input_of(batch).to(self._device, non_blocking=True)
            if first:
                prints.append((tuple(x.shape), x.detach().double().sum()))
            else:
                self._check(count, x)
            count += 1
            yield x
        if first:
            self._prints = prints
        elif self._prints is not None and count != len(self._prints):
            raise CdistillError(self._changed(f"{count} batches, {len(self._prints)} on the first pass"))

    def _check(self, i: int, x: Tensor) -> None:
        assert self._prints is not None
        if i >= len(self._prints):
            raise CdistillError(self._changed("more batches than on the first pass"))
        shape, total = self._prints[i]
        if tuple(x.shape) != shape:
            raise CdistillError(self._changed(f"batch {i} has shape {tuple(x.shape)}, was {shape}"))
        if not torch.isclose(x.detach().double().sum(), total, rtol=1e-6, atol=1e-6):
            raise CdistillError(self._changed(f"batch {i} holds different values"))

    @staticmethod
    def _changed(what: str) -> str:
        return f"The inputs changed between passes ({what}). " + _FIX
