"""The one percentile definition every benchmark and report of the project uses.

Definition: linear interpolation between the two nearest ranks, numpy's default
(``numpy.percentile(xs, p, method="linear")``): on the sorted values ``x[0..n-1]`` the
``p``-th percentile is ``x[k] + (x[k+1] - x[k]) * f`` with ``k + f = (n - 1) * p / 100``.
So p50 is the median (``statistics.median`` agrees), p0 the minimum and p100 the maximum.
Percentiles of two benchmarks are comparable because both come from here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentile(xs: Iterable[float], p: float, *, presorted: bool = False) -> float:
    """The ``p``-th percentile (0-100) of ``xs``; NaN when empty. ``presorted`` skips the
    sort for callers that take many percentiles of one sorted list."""
    if not 0.0 <= p <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {p}")
    s: Sequence[float] = xs if presorted and isinstance(xs, Sequence) else sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def percentiles(xs: Iterable[float], ps: Iterable[float]) -> list[float]:
    """Several percentiles of one sample, sorted once."""
    s = sorted(xs)
    return [percentile(s, p, presorted=True) for p in ps]
