"""Tests for sharpscope.analysis.bounds (PAC-Bayes bound as written, and the source's variant)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sharpscope.analysis.bounds import pac_bayes_bound, source_variant
from sharpscope.errors import UserError

PROPS = settings(max_examples=50, deadline=None)

N = [10e6, 125e6, 350e6, 1.3e9, 3e9, 7e9]
S = [1.2785, 1.1669, 1.1217, 1.0646, 1.0135, 0.9804]


@pytest.mark.parametrize("m, delta", [(1e5, 0.05), (1e5, 0.01), (2e4, 0.5), (1e7, 1e-6)])
def test_bound_matches_equation_by_hand(m, delta):
    got = pac_bayes_bound(S, N, m=m, delta=delta)
    expected = [math.sqrt((s * math.log(n) + math.log(m / delta)) / m) for s, n in zip(S, N)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_bound_defaults_are_m_1e5_delta_0_05():
    s, n = 1.1, 1.3e9
    expected = math.sqrt((s * math.log(n) + math.log(1e5 / 0.05)) / 1e5)
    assert float(pac_bayes_bound(s, n)) == pytest.approx(expected, rel=1e-12)


def test_source_variant_columns():
    cols = source_variant(S, N, m=1e5)
    assert set(cols) == {"sqrt_s_over_m", "sqrt_ln_n", "source_bound"}
    np.testing.assert_allclose(cols["sqrt_s_over_m"], [math.sqrt(s / 1e5) for s in S], rtol=1e-12)
    np.testing.assert_allclose(cols["sqrt_ln_n"], [math.sqrt(math.log(n)) for n in N], rtol=1e-12)
    np.testing.assert_allclose(cols["source_bound"], cols["sqrt_s_over_m"] * cols["sqrt_ln_n"], rtol=1e-12)
    np.testing.assert_allclose(cols["source_bound"], [math.sqrt(s * math.log(n) / 1e5) for s, n in zip(S, N)],
                               rtol=1e-12)


def test_source_variant_is_the_equation_with_delta_equal_m():
    """ln(m / delta) vanishes for delta = m, leaving sqrt(S ln N / m) (split into two roots)."""
    m = 1e5
    cols = source_variant(S, N, m=m)
    with_delta_m = [math.sqrt((s * math.log(n) + math.log(m / m)) / m) for s, n in zip(S, N)]
    np.testing.assert_allclose(cols["source_bound"], with_delta_m, rtol=1e-12)
    # and the bound as written, with a real delta < 1, is strictly larger
    assert np.all(pac_bayes_bound(S, N, m=m, delta=0.05) > cols["source_bound"])


@PROPS
@given(st.floats(0.01, 100.0), st.floats(1.5, 1e13), st.floats(1.0, 1e9), st.floats(1e-9, 0.999))
def test_bound_property_by_hand_and_monotone(s, n, m, delta):
    b = float(pac_bayes_bound(s, n, m=m, delta=delta))
    assert b == pytest.approx(math.sqrt((s * math.log(n) + math.log(m / delta)) / m), rel=1e-10)
    # sharper (larger S) -> larger bound; smaller delta -> larger bound
    assert float(pac_bayes_bound(2 * s, n, m=m, delta=delta)) > b
    assert float(pac_bayes_bound(s, n, m=m, delta=delta / 2)) > b
    src = source_variant(s, n, m=m)
    assert float(src["source_bound"]) == pytest.approx(math.sqrt(s * math.log(n) / m), rel=1e-10)
    assert float(src["source_bound"]) < b


def test_bound_broadcasts():
    got = pac_bayes_bound(np.array([[1.0], [2.0]]), np.array([1e6, 1e9]))
    assert got.shape == (2, 2)
    assert got[1, 1] == pytest.approx(math.sqrt((2.0 * math.log(1e9) + math.log(1e5 / 0.05)) / 1e5))


@pytest.mark.parametrize("kw", [
    {"m": 0.0}, {"m": -5.0},
    {"delta": 0.0}, {"delta": 1.0}, {"delta": -0.1}, {"delta": 1.5},
])
def test_invalid_m_or_delta_raises_user_error(kw):
    with pytest.raises(UserError, match="PAC-Bayes"):
        pac_bayes_bound(S, N, **kw)


@pytest.mark.parametrize("n", [1.0, 0.5, 0.0, -1e6])
def test_model_size_must_exceed_one(n):
    with pytest.raises(UserError, match="above 1"):
        pac_bayes_bound([1.0, 1.0], [1e6, n])


def test_nan_m_raises_user_error():
    with pytest.raises(UserError):
        pac_bayes_bound(S, N, m=float("nan"))


def test_nan_delta_raises_user_error():
    with pytest.raises(UserError):
        pac_bayes_bound(S, N, delta=float("nan"))
