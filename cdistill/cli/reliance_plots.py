"""Plots of the reliance measures (:mod:`cdistill.cli.reliance_report`), one panel per seed and
one colour per stage (e.g. base vs concept-distilled):

- :func:`plot_spectrum`: the layer's causal energy spectrum (energy of each of the top causal
  directions, log scale) above the share of each direction inside the bias subspace;
- :func:`plot_agreement`: the concept-only agreement per concept value with its Wilson 95%
  interval, and chance as a dashed line.

Matplotlib with the Agg backend (no display); each function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cdistill.cli.reliance_report import RelianceDetail

#: A panel: its title (e.g. ``seed 1``) and, per stage label, what was measured.
Panel = tuple[str, Mapping[str, RelianceDetail]]
#: Energies under this are drawn at it (a log axis has no 0).
ENERGY_FLOOR = 1e-6


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bar_offsets(n: int, width: float) -> list[float]:
    """x offsets of ``n`` bars of ``width`` centred on a tick."""
    return [(i - (n - 1) / 2) * width for i in range(n)]


def plot_spectrum(panels: Sequence[Panel], path: Path) -> Path | None:
    """The causal energy spectrum with each direction's share in the bias subspace (PNG).

    Args:
        panels: One per seed; stages without energies (``k = 0``) are left out.
        path: Where the PNG goes.

    Returns:
        ``path``, or None when no stage of any panel has a spectrum (nothing written).
    """
    panels = [(t, {s: d for s, d in stages.items() if d.energies}) for t, stages in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels) + 0.6, 5.2), squeeze=False,
                             sharex="col", gridspec_kw={"height_ratios": [3, 2]})
    for col, (title, stages) in enumerate(panels):
        top, bottom = axes[0, col], axes[1, col]
        width = 0.8 / len(stages)
        for offset, (stage, d) in zip(_bar_offsets(len(stages), width), stages.items(), strict=True):
            xs = np.arange(1, len(d.energies) + 1)
            top.plot(xs, np.maximum(d.energies, ENERGY_FLOOR), marker="o", ms=3, label=stage)
            bottom.bar(xs + offset, d.shares, width=width, label=stage)
        ref = next((d.random_share for d in stages.values() if d.random_share is not None), None)
        if ref is not None:
            bottom.axhline(ref, color="k", ls="--", lw=0.8, label="random direction (r/d)")
        top.set_yscale("log")
        top.set_title(title, fontsize=9)
        bottom.set_ylim(0, 1.0)
        bottom.set_xlabel("causal direction (by energy)")
        if col == 0:
            top.set_ylabel("energy: ablation KL (nats)")
            bottom.set_ylabel("share in bias subspace")
            top.legend(fontsize=7)
            bottom.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_agreement(panels: Sequence[Panel], path: Path) -> Path:
    """Concept-only agreement per concept value, with Wilson 95% intervals and chance (PNG).

    Args:
        panels: One per seed.
        path: Where the PNG goes.
    """
    plt = _pyplot()
    n_values = max((len(d.values) for _, stages in panels for d in stages.values()), default=1)
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(max(3.2, 0.45 * n_values + 1.2) * max(len(panels), 1), 3.2),
                             squeeze=False, sharey="row")
    for col, (title, stages) in enumerate(panels):
        ax = axes[0, col]
        width = 0.8 / max(len(stages), 1)
        chance = None
        for offset, (stage, d) in zip(_bar_offsets(len(stages), width), stages.items(), strict=True):
            xs = np.arange(len(d.values))
            rate = np.array([a.rate for a in d.agreement])
            err = np.array([[a.rate - a.lo for a in d.agreement], [a.hi - a.rate for a in d.agreement]])
            ax.bar(xs + offset, rate, width=width, yerr=err, capsize=2, label=stage)
            ax.set_xticks(xs, [str(k) for k in d.classes], fontsize=7)
            chance = d.agreement[0].chance if d.agreement else chance
        if chance is not None:
            ax.axhline(chance, color="k", ls="--", lw=0.8, label="chance")
        ax.set_ylim(0, 1.22)  # headroom for the legend above the bars
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("concept value (the class it points to)", fontsize=8)
        if col == 0:
            ax.set_ylabel("concept-only agreement")
            ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


#: Stage keys of the pipeline's records -> legend labels.
STAGES = {"base": "base", "cd": "concept-distilled"}


def reliance_figures(per_seed: Sequence[Mapping[str, Any]], out: Path) -> dict[str, Path]:
    """The pipeline's reliance plots from its per-seed records (``record["reliance"][stage]``:
    an :func:`~dataclasses.asdict` of :class:`RelianceDetail`, stages ``base`` and ``cd``), one
    panel per seed: ``<out>/reliance_spectrum.png`` and ``<out>/reliance_agreement.png``.

    Returns:
        Plot key (``reliance_spectrum``, ``reliance_agreement``) -> PNG; empty when no seed was measured.
    """
    panels: list[Panel] = []
    for r in per_seed:
        stages = r.get("reliance") or {}
        if stages:
            panels.append((f"seed {r.get('seed')}", {STAGES.get(s, s): RelianceDetail.from_dict(d) for s, d in stages.items()}))
    if not panels:
        return {}
    figures = {"reliance_agreement": plot_agreement(panels, out / "reliance_agreement.png")}
    spectrum = plot_spectrum(panels, out / "reliance_spectrum.png")
    if spectrum is not None:
        figures["reliance_spectrum"] = spectrum
    return figures
