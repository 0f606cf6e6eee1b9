"""The one percentile definition: numpy's default (linear interpolation)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from dynamo_ext.stats import percentile, percentiles


def test_percentile_is_numpys_linear_default() -> None:
    rng = random.Random(0)
    for n in (1, 2, 3, 10, 101):
        xs = [rng.random() for _ in range(n)]
        for p in (0, 1, 50, 90, 99, 99.9, 100):
            assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)), abs=1e-12)
        assert percentiles(xs, (50, 99)) == [percentile(xs, 50), percentile(xs, 99)]


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input is sorted
    assert percentile([1.0, 2.0, 3.0], 50, presorted=True) == 2.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)
