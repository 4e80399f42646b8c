"""Seed statistics against independent implementations: Python's ``statistics`` and SciPy's paired t-test."""

from __future__ import annotations

import random
import statistics

import pytest
from scipy.stats import ttest_rel

from metapeft.stats import format_difference, format_summary, paired_difference, summarize


@pytest.mark.parametrize("values", [[0.5], [0.527, 0.507, 0.587], [1.0, 2.0, 4.0, 8.0, 16.0]], ids=["1", "3", "5"])
def test_summarize_matches_statistics(values):
    summary = summarize(values)
    assert summary.n == len(values)
    assert summary.mean == pytest.approx(statistics.fmean(values), rel=1e-12)
    if len(values) == 1:
        assert summary.std is None
    else:
        assert summary.std == pytest.approx(statistics.stdev(values), rel=1e-12)


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_paired_interval_matches_scipy_ttest_rel(n, confidence):
    generator = random.Random(n)
    a = [generator.uniform(0.4, 0.6) for _ in range(n)]
    b = [x + generator.gauss(0.02, 0.03) for x in a]
    ours = paired_difference(a, b, confidence)
    oracle = ttest_rel(b, a).confidence_interval(confidence)
    assert ours.n == n and ours.confidence == confidence
    assert ours.mean == pytest.approx(statistics.fmean([y - x for x, y in zip(a, b)]), rel=1e-12)
    assert ours.low == pytest.approx(float(oracle.low), rel=1e-9)
    assert ours.high == pytest.approx(float(oracle.high), rel=1e-9)


def test_single_pair_has_no_interval_and_bad_input_is_named():
    single = paired_difference([0.5], [0.6])
    assert single.mean == pytest.approx(0.1) and single.low is None and single.high is None
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([0.1, 0.2], [0.3])
    with pytest.raises(ValueError, match="non-finite"):
        summarize([0.1, float("nan")])
    with pytest.raises(ValueError, match="empty"):
        summarize([])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([0.1, 0.2], [0.3, 0.4], confidence=95)


def test_formats():
    assert format_summary(summarize([0.5, 0.6])) == "55.0 +- 7.1"
    assert format_summary(summarize([12.0]), scale=1.0) == "12.0"
    assert format_difference(paired_difference([0.5], [0.52])) == "+2.0"
    difference = paired_difference([0.5, 0.5, 0.5], [0.51, 0.53, 0.55])
    assert format_difference(difference) == f"+3.0 [{100 * difference.low:+.1f}, {100 * difference.high:+.1f}]"
