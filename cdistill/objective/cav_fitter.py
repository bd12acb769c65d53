"""Fit, gate, refresh and blend the CAVs of a task's concept terms, without Lightning.

A :class:`CAVFitter` turns activations of concept sets into a :class:`~cdistill.concepts.cav.CAVBank`
and an index ``[T, C]`` (the bank row of term ``t`` for class ``c``; -1: no trusted CAV). The
concept-distillation task fits one CAV per (term, class) on one layer; the intrinsic task one
per term on the term's own layer (``C = 1``). The caller owns the activations (how they are
computed, cached or mapped from a teacher) and the buffers; the fitter owns the rules:

- **fit**: one :func:`~cdistill.concepts.cav.fit_cav` per distinct ``(concept, negative, layer)``;
- **gate**: a CAV whose held-out accuracy is below ``min_accuracy`` is skipped (warned), and a
  fit where every CAV is skipped raises :class:`CAVGateError`;
- **refresh**: a refit during training blends into the running CAVs with weight ``ema`` when
  the same CAVs passed the gate (else the fresh bank is adopted: rows of different CAVs must
  not be blended); a refit where every CAV fails the gate keeps the running ones (warned).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor

from cdistill.concepts.cav import CAVBank, CAVResult, fit_cav, position_rows
from cdistill.errors import CdistillError
from cdistill.objective.config import CAVConfig, ConceptTerm, term_name
from cdistill.objective.losses import check_subspace_rank

#: Activations of the concept sets at a layer: ``layer -> {set name: rows [N, d]}``.
RowsAt = Callable[[str], Mapping[str, Tensor]]


class CAVGateError(CdistillError):
    """Every CAV of a fit fell below the accuracy gate."""


def concept_rows(maps: Mapping[str, Tensor], cfg: CAVConfig, blank: Tensor | None = None) -> dict[str, Tensor]:
    """CAV training rows of every concept set from its activations.

    Args:
        maps: Set name -> activations ``[N, *shape]``.
        cfg: ``cav_mode`` (and, for ``position``, ``position_threshold`` and ``max_rows``).
        blank: ``[C, H, W]`` activation of a blank image (position mode's reference), or ``None``.

    Returns:
        ``{name: [N, d]}`` flattened activations (``flatten``), or ``{name: [M, C]}`` channel
        vectors at the content positions of the set's images (``position``, see
        :func:`cdistill.concepts.cav.position_rows`; the subset of set ``i`` is seeded with ``i``).
    """
    if cfg.cav_mode != "position":
        return {name: acts.flatten(1) for name, acts in maps.items()}
    return {
        name: position_rows(acts, blank, threshold=float(cfg.position_threshold), max_rows=cfg.max_rows, seed=i)
        for i, (name, acts) in enumerate(maps.items())
    }


def difference_rows(diff: Tensor, cfg: CAVConfig, seed: int) -> Tensor:
    """CAV rows of activation differences ``[n, *shape]``: flattened ``[n, d]``, or per-position
    channel vectors ``[m, C]`` (``position`` mode; a subset of at most ``max_rows`` seeded with ``seed``)."""
    if cfg.cav_mode != "position":
        return diff.flatten(1)
    rows = diff.flatten(2).transpose(1, 2).reshape(-1, diff.shape[1])  # [n * P, C]
    keep = int(cfg.max_rows) if cfg.max_rows is not None else len(rows)
    if len(rows) > keep:
        gen = torch.Generator().manual_seed(seed)
        rows = rows[torch.randperm(len(rows), generator=gen)[:keep].to(rows.device)]
    return rows


def negative_rows(rows: Mapping[str, Tensor], name: str) -> Tensor:
    """The rows of set ``name``, or of every set ``name/<i>`` (a pool, e.g. ``random/0 ...``)."""
    if name in rows:
        return rows[name]
    pool = [v for k, v in rows.items() if k.startswith(f"{name}/")]
    if not pool:
        raise CdistillError(f"Negative set {name!r} is not in the concept spec; it has {sorted(rows)}.")
    return torch.cat(pool)


@dataclass(frozen=True)
class CAVFitter:
    """The CAV rules of a task (see the module docstring).

    Args:
        cfg: Solver, gate, held-out fraction and ``ema``.
        terms: The concept terms (``T``).
        num_classes: Columns ``C`` of the index (1: the term's concept has no ``{y}``).
        layer: Layer of the terms that name none.
    """

    cfg: CAVConfig
    terms: tuple[ConceptTerm, ...]
    num_classes: int = 1
    layer: str = ""

    def _fit_one(self, rows: Mapping[str, Tensor], term: ConceptTerm, concept: str, layer: str) -> CAVResult | None:
        """The CAV of ``concept`` vs the term's negative, or ``None`` below the gate (warned)."""
        if concept not in rows:
            raise CdistillError(
                f"Concept {concept!r} (term {term_name(term)!r}) is not in the concept spec; it has {sorted(rows)}."
            )
        res = fit_cav(
            rows[concept], negative_rows(rows, term.negative), self.cfg.solver,
            test_fraction=float(self.cfg.test_fraction), seed=0, concept=concept, negative=term.negative, layer=layer,
        )
        gate = float(self.cfg.min_accuracy)
        if not res.accuracy >= gate:  # NaN fails too
            rank_zero_warn(
                f"CAV {concept!r} vs {term.negative!r} at {layer!r} has held-out accuracy "
                f"{res.accuracy:.3f} < {gate}: not trusted, its term is skipped there."
            )
            return None
        return res

    def fit(self, rows_at: RowsAt) -> tuple[CAVBank, Tensor]:
        """Fit one CAV per (term, class) and gate them.

        Args:
            rows_at: Layer -> ``{set name: rows}`` (called once per layer).

        Returns:
            The bank and ``index [T, C]`` (long, on the CPU; -1: skipped).

        Raises:
            CAVGateError: Every CAV fell below the gate.
        """
        bank = CAVBank()
        index = torch.full((len(self.terms), self.num_classes), -1, dtype=torch.long)
        rows_of: dict[str, Mapping[str, Tensor]] = {}
        fitted: dict[tuple[str, str, str], int] = {}
        for t, term in enumerate(self.terms):
            layer = term.layer or self.layer
            if layer not in rows_of:
                rows_of[layer] = rows_at(layer)
            classes = range(self.num_classes) if term.classes is None else term.classes
            for k in classes:
                key = (term.concept.format(y=k), term.negative, layer)
                if key not in fitted:
                    res = self._fit_one(rows_of[layer], term, key[0], layer)
                    fitted[key] = -1 if res is None else bank.add(res)
                index[t, k] = fitted[key]
        if self.terms and bool((index < 0).all()):
            layers = sorted({t.layer or self.layer for t in self.terms})
            raise CAVGateError(
                "Every CAV fell below the accuracy gate (model.concepts.min_accuracy): the layer(s) "
                f"{layers} do not separate the concept sets. Try another layer."
            )
        return bank, index

    def blend(self, bank: CAVBank, index: Tensor, fresh: CAVBank, fresh_index: Tensor) -> tuple[CAVBank, Tensor]:
        """The running CAVs after a refit: ``normalize((1 - ema) v + ema v_fresh)`` when the
        same CAVs passed the gate (``bank`` is updated in place), else (or with ``ema = 1``) the fresh ones."""
        fresh_index = fresh_index.to(index.device)
        if self.cfg.ema >= 1.0 or not torch.equal(fresh_index, index):
            return fresh.to(bank.vectors.device), fresh_index
        ema = float(self.cfg.ema)
        bank.vectors = F.normalize((1 - ema) * bank.vectors + ema * fresh.vectors.to(bank.vectors.device), dim=1)
        return bank, index

    def refresh(
        self, bank: CAVBank, index: Tensor, refit: Callable[[], tuple[CAVBank, Tensor]], when: str = ""
    ) -> tuple[CAVBank, Tensor]:
        """Refit (``refit()``, e.g. :meth:`fit` on current activations) and :meth:`blend`; when
        every fresh CAV fails the gate, keep the running ones (warned) rather than stop training."""
        try:
            fresh, fresh_index = refit()
        except CAVGateError as err:
            rank_zero_warn(f"CAV refit {when} skipped, keeping the previous CAVs: {err}")
            return bank, index
        return self.blend(bank, index, fresh, fresh_index)

    def check_subspaces(self, bank: CAVBank, index: Tensor) -> None:
        """Check every subspace term's ``rank`` against the span of its fitted CAVs (see
        :func:`cdistill.objective.losses.check_subspace_rank`)."""
        for t, term in enumerate(self.terms):
            rows = index[t][index[t] >= 0].unique()
            if term.subspace and len(rows):
                check_subspace_rank(bank.vectors[rows], term.rank, term_name(term))
