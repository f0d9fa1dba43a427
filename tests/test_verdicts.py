"""The tests and verdict rules the claims use (analysis/verdicts.py): the verdict rules on
their edges, and the statistics against scipy computed directly."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from sharpscope.analysis.verdicts import (FAILS, HOLDS, UNCLEAR, fraction_verdict, partial_r, pearson_test,
                                          signed_verdict, slope_test)


def test_verdict_rules():
    assert signed_verdict(-0.5, 0.01, -1) == HOLDS
    assert signed_verdict(0.5, 0.01, -1) == FAILS
    assert signed_verdict(-0.5, 0.2, -1) == UNCLEAR
    assert signed_verdict(float("nan"), 0.01, -1) == UNCLEAR
    assert fraction_verdict(2, 3) == HOLDS and fraction_verdict(1, 3) == FAILS and fraction_verdict(1, 2) == UNCLEAR
    assert fraction_verdict(0, 0) == UNCLEAR


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=12), st.floats(0.01, 100), st.floats(-50, 50))
def test_pearson_and_slope_tests_match_scipy(ys, scale, shift):
    x = np.arange(len(ys), dtype=float)
    y = np.asarray(ys)
    r, p, n = pearson_test(x, y)
    if np.ptp(y) == 0:
        assert math.isnan(r)
        return
    want = stats.pearsonr(x, y)
    assert r == pytest.approx(want[0], abs=1e-9) and n == len(ys)
    if np.ptp(y) > 1e-6:  # invariant to an affine change of units of y (beyond rounding)
        r2, p2, _ = pearson_test(x, scale * y + shift)
        assert r2 == pytest.approx(r, abs=1e-6)
    slope, sp, r2fit, _ = slope_test(x, y)
    assert slope == pytest.approx(stats.linregress(x, y).slope, rel=1e-9, abs=1e-9)


def test_pearson_needs_three_finite_pairs():
    assert math.isnan(pearson_test([1, 2, float("nan")], [1, 2, 3])[0])


def test_partial_r_removes_the_shared_trend():
    control = np.arange(6.0)
    a = 2 * control + np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    b = -3 * control + np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    assert np.corrcoef(a, b)[0, 1] < -0.8  # the plain r is the shared trend
    assert partial_r(a, b, control) == pytest.approx(1.0)
    assert math.isnan(partial_r(a[:3], b[:3], control[:3]))  # needs four points
