"""Fitted CAVs: one :class:`CAVResult` per fit, and the :class:`CAVBank` that holds them as
module buffers (checkpoints carry them, ``.to()`` moves them, ``weights_only=True`` loads them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cdistill.errors import CdistillError, unknown_name
from cdistill.utils.buffers import FittedBuffers


@dataclass
class CAVResult:
    """A fitted CAV and how well its linear probe separates held-out activations.

    Attributes:
        vector: Unit normal ``[d]`` in activation space, pointing towards the concept.
        bias: Offset so that ``vector·a + bias > 0`` predicts the concept.
        accuracy: Held-out accuracy (mean over samples), or the training accuracy when
            ``n_test == 0``.
        accuracy_pos: Held-out accuracy on concept samples.
        accuracy_neg: Held-out accuracy on negative samples.
        train_accuracy: Accuracy on the training split.
        n_train: Training samples. n_test: Held-out samples.
    """

    vector: Tensor
    bias: float
    accuracy: float
    accuracy_pos: float
    accuracy_neg: float
    train_accuracy: float
    n_train: int
    n_test: int
    solver: str
    concept: str = "concept"
    negative: str = "random"
    layer: str = ""


_META_KEYS = ("concepts", "negatives", "layers", "solvers")


class CAVBank(FittedBuffers):
    """Fitted CAVs as module buffers, so checkpoints carry them and ``.to()`` moves them.

    Buffers: ``vectors [m, d]`` (unit rows), ``biases [m]``, ``accuracies [m]``
    (held-out). Metadata (concept, negative set, layer, solver per row) are python lists
    stored through ``get_extra_state``, which keeps the state dict loadable with
    ``torch.load(..., weights_only=True)``. All rows share one dimension ``d``; use one
    bank per layer when layers differ in size.
    """

    vectors: Tensor
    biases: Tensor
    accuracies: Tensor
    resizable = ("vectors", "biases", "accuracies")

    def __init__(self, results: Sequence[CAVResult] = ()) -> None:
        super().__init__()
        self.register_buffer("vectors", torch.zeros(0, 0))
        self.register_buffer("biases", torch.zeros(0))
        self.register_buffer("accuracies", torch.zeros(0))
        self.concepts: list[str] = []
        self.negatives: list[str] = []
        self.layers: list[str] = []
        self.solvers: list[str] = []
        for result in results:
            self.add(result)

    def __len__(self) -> int:
        return len(self.concepts)

    @property
    def dim(self) -> int:
        """Activation dimension ``d`` (0 for an empty bank)."""
        return int(self.vectors.shape[1])

    def add(self, result: CAVResult) -> int:
        """Append a fitted CAV; returns its row index."""
        vec = result.vector.detach().reshape(-1)
        if len(self) and vec.numel() != self.dim:
            raise CdistillError(
                f"CAV of concept {result.concept!r} at layer {result.layer!r} has d="
                f"{vec.numel()}, but this bank holds d={self.dim} (layers "
                f"{sorted(set(self.layers))}); use one CAVBank per layer size."
            )
        # An empty bank adopts the first vector's device; rows are float32 by default.
        device = self.vectors.device if len(self) else vec.device
        dtype = self.vectors.dtype if len(self) else torch.float32
        old = self.vectors if len(self) else self.vectors.new_zeros(0, vec.numel())
        scalars = torch.tensor([[result.bias, result.accuracy]], dtype=dtype, device=device)
        self.vectors = torch.cat([old.to(device, dtype), vec.to(device, dtype)[None]])
        self.biases = torch.cat([self.biases.to(device, dtype), scalars[:, 0]])
        self.accuracies = torch.cat([self.accuracies.to(device, dtype), scalars[:, 1]])
        self.concepts.append(result.concept)
        self.negatives.append(result.negative)
        self.layers.append(result.layer)
        self.solvers.append(result.solver)
        return len(self) - 1

    def indices(
        self, concept: str, layer: str | None = None, negative: str | None = None
    ) -> list[int]:
        """Rows of ``concept`` (optionally only at ``layer`` / against ``negative``).

        Raises:
            CdistillError: No such concept (close names listed) or no row matches.
        """
        if concept not in self.concepts:
            raise unknown_name("concept", concept, self.concepts, "Use a concept of this CAV bank.")
        entries = list(zip(self.concepts, self.layers, self.negatives, strict=True))
        rows = [
            i
            for i, (c, ly, ng) in enumerate(entries)
            if c == concept and (layer is None or ly == layer) and (negative is None or ng == negative)
        ]
        if not rows:
            have = sorted({(ly, ng) for c, ly, ng in entries if c == concept})
            raise CdistillError(
                f"No CAV of concept {concept!r} at layer {layer!r} against {negative!r}; "
                f"it has (layer, negative) = {have}."
            )
        return rows

    def vector(self, concept: str, layer: str | None = None, negative: str | None = None) -> Tensor:
        """The unit CAV ``[d]`` of one concept; the arguments must pick exactly one row."""
        rows = self.indices(concept, layer, negative)
        if len(rows) > 1:
            choices = [(self.layers[i], self.negatives[i]) for i in rows]
            raise CdistillError(
                f"Concept {concept!r} has {len(rows)} CAVs (layer, negative) = {choices}; "
                "pass layer= and/or negative= to pick one."
            )
        return self.vectors[rows[0]]

    def at_layer(self, layer: str) -> tuple[list[str], Tensor]:
        """Concept names and CAVs ``[k, d]`` of every row at ``layer``."""
        if layer not in self.layers:
            raise unknown_name("CAV layer", layer, self.layers, "Use a layer of this CAV bank.")
        rows = [i for i, ly in enumerate(self.layers) if ly == layer]
        return [self.concepts[i] for i in rows], self.vectors[rows]

    def get_extra_state(self) -> dict[str, list[str]]:
        return {key: list(getattr(self, key)) for key in _META_KEYS}

    def set_extra_state(self, state: Any) -> None:
        for key in _META_KEYS:
            setattr(self, key, [str(s) for s in state[key]])

    def save(self, path: str | Path) -> None:
        """Write the bank to ``path`` (loadable with ``torch.load(weights_only=True)``)."""
        payload = {
            "format": "cdistill.CAVBank",
            "version": 1,
            "vectors": self.vectors.detach().cpu(),
            "biases": self.biases.detach().cpu(),
            "accuracies": self.accuracies.detach().cpu(),
            **self.get_extra_state(),
        }
        torch.save(payload, Path(path))

    @classmethod
    def load(cls, path: str | Path, map_location: str | torch.device = "cpu") -> CAVBank:
        """Read a bank written by :meth:`save` (safe: ``weights_only=True``)."""
        payload = torch.load(Path(path), map_location=map_location, weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != "cdistill.CAVBank":
            raise CdistillError(f"{path} is not a CAV bank written by CAVBank.save().")
        bank = cls()
        bank.vectors = payload["vectors"]
        bank.biases = payload["biases"]
        bank.accuracies = payload["accuracies"]
        bank.set_extra_state(payload)
        return bank

    def extra_repr(self) -> str:
        return f"m={len(self)}, d={self.dim}, concepts={sorted(set(self.concepts))}"
