"""Plain-words warnings of the pipeline report: a concept loss near zero is not debiasing.

Two rules, per seed, both starting from a *satisfied* concept term (:func:`concept_satisfied`):

- :func:`stalled_warnings`: bias-conflicting validation accuracy did not rise
  (:data:`MOVED`) over the base model's;
- :func:`reliance_warnings`: the interventional reliance measures
  (:mod:`cdistill.cli.reliance_report`) did not move (:func:`reliance_unmoved`): the model
  still relies on the concept.

The rules are pure functions of the per-seed records (``{"seed", "base": metrics, "cd":
metrics}``); :func:`first_logged` reads the concept term's first logged value from a run's CSV
metrics, which :func:`concept_satisfied` compares the last epoch's with.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: The concept terms the warnings look at, in order: gradient direction, concept-only outputs,
#: RR-ClArC, the student's side of the adversarial probe (a fooled probe is not a removed cue).
TERMS = ("train/concept", "train/output", "train/rrclarc", "train/probe")
#: A concept term whose last-epoch mean is under this counts as satisfied, whatever its start
#: (a loss that starts near zero is satisfied from the first step).
SATISFIED = 0.05
#: A concept term whose last-epoch mean is at most this share of its first logged value (the
#: ``<term>_first`` key of the CD run's metrics) counts as satisfied: it fell by 90% or more.
SATISFIED_SHARE = 0.1
#: Bias-conflicting validation accuracy must rise by at least this much (a fraction) to count as moved.
MOVED = 0.02
#: A reliance measure counts as moved once it has covered this share of its way from the base
#: model's value to "no reliance" (chance for the concept-only agreement, 0 for the ablation KL).
RELIANCE_MOVED = 1 / 3
#: Suffix of the key holding a term's first logged value in the CD run's metrics.
FIRST = "_first"


def first_logged(run_dir: Path, term: str) -> float | None:
    """The first value of ``term`` (e.g. ``train/output``) a CSV logger wrote under ``run_dir``
    (``<term>_step`` rows first, else ``<term>_epoch``, else ``<term>``); None when no
    ``metrics.csv`` there has it (e.g. no CSV logger, or ``trainer.fast_dev_run``)."""
    for path in sorted(run_dir.rglob("metrics.csv")):
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        for key in (f"{term}_step", f"{term}_epoch", term):
            values = [r[key] for r in rows if r.get(key) not in (None, "")]
            if values:
                return float(values[0])
    return None


def concept_term(cd: Mapping[str, float]) -> str | None:
    """The first of :data:`TERMS` the CD run logged."""
    return next((k for k in TERMS if k in cd), None)


def concept_satisfied(first: float | None, last: float) -> bool:
    """Whether a concept term has fallen near zero: its last-epoch mean ``last`` is under
    :data:`SATISFIED`, or at most :data:`SATISFIED_SHARE` of its first logged value ``first``
    (None: unknown)."""
    return last < SATISFIED or (first is not None and first > 0 and last <= SATISFIED_SHARE * first)


def _satisfied_term(cd: Mapping[str, float]) -> tuple[str, str] | None:
    """``(term, "first -> last")`` of the CD run's satisfied concept term, else None."""
    term = concept_term(cd)
    if term is None:
        return None
    first, last = cd.get(term + FIRST), float(cd[term])
    if not concept_satisfied(None if first is None else float(first), last):
        return None
    return term, (f"{float(first):.4f} -> {last:.4f}" if first is not None else f"{last:.4f}")


def _conflicting(metrics: Mapping[str, float]) -> float | None:
    for key in ("val_reversed/acc_conflicting", "val_reversed/acc", "val/acc_conflicting"):
        if key in metrics:
            return float(metrics[key])
    return None


def stalled_warnings(per_seed: Sequence[Mapping[str, Any]]) -> list[str]:
    """One warning per seed whose concept term is satisfied (:func:`concept_satisfied`) while
    bias-conflicting validation accuracy (last epoch) rose by less than :data:`MOVED` over the
    base model's: a loss near 0 is not debiasing."""
    out = []
    for r in per_seed:
        base, cd = r.get("base", {}), r.get("cd", {})
        sat = _satisfied_term(cd)
        before, after = _conflicting(base), _conflicting(cd)
        if sat is None or before is None or after is None:
            continue
        if after - before < MOVED:
            out.append(f"seed {r.get('seed')}: {sat[0]} = {sat[1]} (satisfied) but bias-conflicting "
                       f"validation accuracy moved {100 * before:.1f}% -> {100 * after:.1f}%: the model may read "
                       "the cue in a way the concept term does not see (docs/methods.md §2.8).")
    return out


def reliance_unmoved(before: Mapping[str, float], after: Mapping[str, float]) -> list[str]:
    """The reliance measures that did not move from ``before`` (base) to ``after`` (CD), in words;
    empty when any measured one moved, or when neither was measured on both.

    - concept-only agreement: not moved while its Wilson lower end is still above chance and
      it covered less than :data:`RELIANCE_MOVED` of its way down to chance;
    - bias-subspace ablation KL: not moved while it fell by less than :data:`RELIANCE_MOVED`.
    """
    agree, kl = "reliance/concept_agreement", "reliance/ablation_kl"
    measured, stuck = 0, []
    if all(agree in m for m in (before, after)) and all(k in after for k in (agree + "_lo", "reliance/chance")):
        measured += 1
        b, a, lo, chance = before[agree], after[agree], after[agree + "_lo"], after["reliance/chance"]
        if lo > chance and a - chance > (1 - RELIANCE_MOVED) * (b - chance):
            stuck.append(f"concept-only agreement {b:.2f} -> {a:.2f} (95% CI from {lo:.2f}, chance {chance:.2f})")
    if kl in before and kl in after:
        measured += 1
        if after[kl] > (1 - RELIANCE_MOVED) * before[kl]:
            stuck.append(f"bias-subspace ablation KL {before[kl]:.3g} -> {after[kl]:.3g} nats")
    return stuck if measured and len(stuck) == measured else []


def reliance_warnings(per_seed: Sequence[Mapping[str, Any]]) -> list[str]:
    """One warning per seed whose concept term is satisfied (:func:`concept_satisfied`) while
    the reliance measures have not moved (:func:`reliance_unmoved`)."""
    out = []
    for r in per_seed:
        base, cd = r.get("base", {}), r.get("cd", {})
        sat = _satisfied_term(cd)
        stuck = reliance_unmoved(base, cd)
        if sat is not None and stuck:
            out.append(f"seed {r.get('seed')}: the concept loss is satisfied ({sat[0]} {sat[1]}), but the model "
                       f"still relies on the concept ({'; '.join(stuck)}): a satisfied concept loss is not "
                       "evidence of debiasing (docs/methods.md §5).")
    return out
