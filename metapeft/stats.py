"""Statistics over seeds: mean +- standard deviation and the paired difference with a t confidence interval.

A method claim rests on several seeds: per metric, the mean and the sample standard deviation (n - 1) of each
method, and for two methods run on the same seeds the mean paired difference d_i = b_i - a_i with the two-sided
Student-t interval ``mean(d) +- t_{(1 + confidence) / 2, n - 1} * std(d) / sqrt(n)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """Mean and sample standard deviation of ``n`` values (``std`` is None for a single value)."""

    mean: float
    std: float | None
    n: int


@dataclass(frozen=True)
class PairedDifference:
    """Mean of the paired differences ``b_i - a_i`` over ``n`` seeds and its t confidence interval
    (``low``/``high`` None for fewer than two pairs)."""

    mean: float
    low: float | None
    high: float | None
    n: int
    confidence: float


def _checked(values: Sequence[float], name: str) -> list[float]:
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{name} is empty: a summary needs at least one value")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} holds a non-finite value: {values}")
    return values


def summarize(values: Sequence[float]) -> Summary:
    """:class:`Summary` (mean, sample std with n - 1) of finite ``values``."""
    values = _checked(values, "values")
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return Summary(mean, std, n)


def paired_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedDifference:
    """The paired difference ``b - a`` of two methods measured on the same seeds (``a[i]``, ``b[i]`` from seed i),
    with its two-sided Student-t ``confidence`` interval (module docstring)."""
    from scipy.stats import t

    a, b = _checked(a, "a"), _checked(b, "b")
    if len(a) != len(b):
        raise ValueError(f"paired values need the same seeds: {len(a)} values in a, {len(b)} in b")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    differences = summarize([y - x for x, y in zip(a, b)])
    if differences.std is None:
        return PairedDifference(differences.mean, None, None, 1, confidence)
    half_width = float(t.ppf((1 + confidence) / 2, differences.n - 1)) * differences.std / math.sqrt(differences.n)
    return PairedDifference(differences.mean, differences.mean - half_width, differences.mean + half_width,
                            differences.n, confidence)


def format_summary(summary: Summary, scale: float = 100.0, digits: int = 1) -> str:
    """``"52.7 +- 1.3"`` (values times ``scale``); just the mean for a single value."""
    if summary.std is None:
        return f"{scale * summary.mean:.{digits}f}"
    return f"{scale * summary.mean:.{digits}f} +- {scale * summary.std:.{digits}f}"


def format_difference(difference: PairedDifference, scale: float = 100.0, digits: int = 1) -> str:
    """``"+2.1 [-0.4, +4.6]"`` (values times ``scale``); just the difference for a single pair."""
    text = f"{scale * difference.mean:+.{digits}f}"
    if difference.low is None:
        return text
    return f"{text} [{scale * difference.low:+.{digits}f}, {scale * difference.high:+.{digits}f}]"
