"""``mean ± std`` cells for the reports of the pipeline and the benchmark scripts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: What a table shows where nothing was measured.
MISSING = "-"


def format_mean_std(mean: float | None, std: float | None, *, digits: int = 2, sci: bool = False) -> str:
    """``"mean ± std"`` with ``digits`` decimals (``sci``: scientific notation, so that a p-value
    of 6.7e-05 does not read as 0.00); :data:`MISSING` when either is None."""
    if mean is None or std is None:
        return MISSING
    spec = f".{digits}{'e' if sci else 'f'}"
    return f"{mean:{spec}} ± {std:{spec}}"


def mean_std(
    values: Sequence[float], *, scale: float = 1.0, digits: int = 2, sci: bool = False, bare_single: bool = False
) -> str:
    """``"mean ± std"`` of ``values`` times ``scale`` (sample std, ddof=1; 0 for one value).

    Args:
        values: The measurements (e.g. one per seed); none gives :data:`MISSING`.
        scale: Factor applied to mean and std (100 for percent).
        digits: Decimals shown.
        sci: Scientific notation.
        bare_single: One value is shown alone, without ``± 0``.
    """
    if len(values) == 0:
        return MISSING
    if bare_single and len(values) == 1:
        return f"{scale * values[0]:.{digits}{'e' if sci else 'f'}}"
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return format_mean_std(scale * float(np.mean(values)), scale * std, digits=digits, sci=sci)
