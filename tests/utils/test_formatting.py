"""The one ``mean ± std`` formatter of the pipeline and the benchmark scripts."""

from __future__ import annotations

from cdistill.utils.formatting import MISSING, format_mean_std, mean_std


def test_mean_std_sample_std_scale_and_digits() -> None:
    assert mean_std([0.5, 0.7], scale=100.0) == "60.00 ± 14.14"
    assert mean_std([0.5, 0.7], scale=100.0, digits=1) == "60.0 ± 14.1"
    assert mean_std([0.25]) == "0.25 ± 0.00"
    assert mean_std([0.25], bare_single=True) == "0.25"
    assert mean_std([]) == MISSING


def test_format_mean_std_p_values_in_scientific_notation() -> None:
    assert format_mean_std(6.7e-05, 1e-06, sci=True) == "6.70e-05 ± 1.00e-06"
    assert format_mean_std(None, 0.1) == MISSING
