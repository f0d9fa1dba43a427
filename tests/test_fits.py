"""Tests for sharpscope.analysis.fits (SPEC section 5: scaling law, power law, AIC, LOO)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats

from sharpscope.analysis.fits import Z95, ScalingLaw, aic, check_xy, line_fit, pearson
from sharpscope.errors import UserError

PUBLISHED_N = [10e6, 125e6, 350e6, 1.3e9, 3e9, 7e9]
PUBLISHED_S = [1.2785, 1.1669, 1.1217, 1.0646, 1.0135, 0.9804]

PROPS = settings(max_examples=50, deadline=None)


# --------------------------------------------------------------------------- published numbers

def test_published_headline_statistics():
    fit = ScalingLaw(PUBLISHED_N, PUBLISHED_S).summary()
    assert fit.n == 6
    assert round(fit.slope, 4) == -0.1055
    assert round(fit.intercept, 4) == 2.0196
    assert round(fit.r2, 4) == 0.9983
    assert round(fit.r, 4) == -0.9991
    assert round(fit.aic_loglinear, 2) == -61.86
    assert round(fit.aic_power, 2) == -54.92
    assert round(fit.power_r2, 4) == 0.9945
    assert round(fit.loo_mean_pct, 2) == 0.50
    assert round(fit.loo_max_pct, 2) == 0.92
    assert fit.preferred == "log-linear"


def test_published_power_law_is_measured_on_s_not_log_s():
    """Power-law R^2 and AIC are computed from residuals of S itself (SPEC section 5)."""
    n = np.asarray(PUBLISHED_N)
    s = np.asarray(PUBLISHED_S)
    c, d = np.polyfit(np.log(n), np.log(s), 1)
    pred = np.exp(d) * n ** c
    rss = float(np.sum((s - pred) ** 2))
    tss = float(np.sum((s - s.mean()) ** 2))
    fit = ScalingLaw(n, s).summary()
    assert fit.power_exponent == pytest.approx(c, rel=1e-10)
    assert fit.power_coef == pytest.approx(math.exp(d), rel=1e-10)
    assert fit.power_r2 == pytest.approx(1 - rss / tss, rel=1e-10)
    assert fit.aic_power == pytest.approx(6 * math.log(rss / 6) + 4, rel=1e-10)


def test_published_loo_by_hand():
    x = np.log10(PUBLISHED_N)
    s = np.asarray(PUBLISHED_S)
    errs = []
    for i in range(6):
        keep = np.arange(6) != i
        a, b = np.polyfit(x[keep], s[keep], 1)
        errs.append(abs(a * x[i] + b - s[i]) / s[i] * 100)
    fit = ScalingLaw(PUBLISHED_N, PUBLISHED_S).summary()
    assert fit.loo_mean_pct == pytest.approx(np.mean(errs), rel=1e-10)
    assert fit.loo_max_pct == pytest.approx(np.max(errs), rel=1e-10)


def test_summary_as_dict_has_all_fields():
    d = ScalingLaw(PUBLISHED_N, PUBLISHED_S).summary().as_dict()
    assert d["preferred"] == "log-linear"
    assert set(d) >= {"slope", "intercept", "r2", "r", "aic_loglinear", "aic_power", "power_r2",
                      "loo_mean_pct", "loo_max_pct", "power_exponent", "power_coef"}


# --------------------------------------------------------------------------- independent truth

@pytest.mark.parametrize("seed", range(5))
def test_line_fit_matches_polyfit_and_linregress(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 30))
    x = rng.uniform(-3, 5, n)
    y = rng.normal(0.5, 2.0) * x + rng.normal(0, 3) + rng.normal(0, 1.0, n)
    f = line_fit(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    lr = stats.linregress(x, y)
    assert f.slope == pytest.approx(slope, rel=1e-9, abs=1e-12)
    assert f.intercept == pytest.approx(intercept, rel=1e-9, abs=1e-12)
    assert f.slope == pytest.approx(lr.slope, rel=1e-9, abs=1e-12)
    assert f.intercept == pytest.approx(lr.intercept, rel=1e-9, abs=1e-12)
    assert f.r == pytest.approx(lr.rvalue, rel=1e-9)
    assert f.r2 == pytest.approx(lr.rvalue ** 2, rel=1e-9)
    resid = y - (slope * x + intercept)
    assert f.rss == pytest.approx(float(resid @ resid), rel=1e-9)
    assert f.n == n
    # the standard error of the mean at x = 0 is the intercept's standard error
    assert float(f.mean_stderr(0.0)) == pytest.approx(lr.intercept_stderr, rel=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_mean_stderr_matches_ols_covariance(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(4, 25))
    x = rng.uniform(6, 11, n)
    y = -0.1 * x + 2 + rng.normal(0, 0.05, n)
    f = line_fit(x, y)
    X = np.column_stack([np.ones(n), x])
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ beta
    sigma2 = float(resid @ resid) / (n - 2)
    cov = sigma2 * np.linalg.inv(X.T @ X)
    x0 = np.array([5.0, 7.3, 9.0, 12.0, 13.5])
    X0 = np.column_stack([np.ones_like(x0), x0])
    expected = np.sqrt(np.einsum("ij,jk,ik->i", X0, cov, X0))
    np.testing.assert_allclose(f.mean_stderr(x0), expected, rtol=1e-8)


def test_mean_stderr_nan_with_two_points():
    f = line_fit([1.0, 2.0], [3.0, 5.0])
    assert np.all(np.isnan(f.mean_stderr(np.array([1.0, 1.5]))))


def test_predict_interval_is_196_standard_errors():
    law = ScalingLaw(PUBLISHED_N, PUBLISHED_S)
    new = [13e9, 30e9, 70e9]
    out = law.predict(new)
    assert [row["n_params"] for row in out] == new
    x0 = np.log10(new)
    se = law.loglinear.mean_stderr(x0)
    assert Z95 == 1.96
    for row, x, s, n in zip(out, x0, se, new):
        mean = law.loglinear.slope * x + law.loglinear.intercept
        assert row["predicted"] == pytest.approx(mean, rel=1e-12)
        assert row["upper"] - row["predicted"] == pytest.approx(1.96 * s, rel=1e-9)
        assert row["predicted"] - row["lower"] == pytest.approx(1.96 * s, rel=1e-9)
        assert row["predicted_power"] == pytest.approx(
            law.power_predict(n), rel=1e-12)
    # extrapolating further out widens the interval
    widths = [row["upper"] - row["lower"] for row in out]
    assert widths[0] < widths[1] < widths[2]


def test_power_law_absent_for_non_positive_values():
    law = ScalingLaw([1e6, 1e7, 1e8, 1e9], [0.5, 0.2, -0.1, -0.4])
    fit = law.summary()
    assert law.power is None
    assert math.isnan(fit.power_exponent) and math.isnan(fit.aic_power)
    assert fit.preferred == "log-linear"
    assert math.isnan(law.predict([1e10])[0]["predicted_power"])


def test_aic_definition():
    assert aic(2.0, 6) == pytest.approx(6 * math.log(2.0 / 6) + 4)
    assert aic(2.0, 6, k=3) == pytest.approx(6 * math.log(2.0 / 6) + 6)
    assert aic(0.0, 6) == -math.inf


def test_pearson_matches_corrcoef_and_drops_non_finite():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=20), rng.normal(size=20)
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1])
    a2, b2 = a.copy(), b.copy()
    a2[4] = np.nan
    b2[7] = np.inf
    keep = np.ones(20, bool)
    keep[[4, 7]] = False
    assert pearson(a2, b2) == pytest.approx(np.corrcoef(a[keep], b[keep])[0, 1])
    assert math.isnan(pearson([1, 2], [3, 4]))
    assert math.isnan(pearson([1, 1, 1], [3, 4, 5]))


# --------------------------------------------------------------------------- properties

# distinct sizes 10^(k/10), k in 50..120 (1e5 .. 1e12 parameters)
sizes = st.lists(st.integers(50, 120), min_size=3, max_size=8, unique=True).map(
    lambda ks: np.array([10 ** (k / 10) for k in ks]))


@PROPS
@given(sizes, st.floats(-0.5, 0.5).filter(lambda a: abs(a) > 1e-2), st.floats(7.0, 10.0))
def test_exact_loglinear_data_is_recovered(n, a, b):
    s = a * np.log10(n) + b  # log10 n <= 12, so s >= 1: relative LOO errors are well defined
    fit = ScalingLaw(n, s).summary()
    assert fit.slope == pytest.approx(a, rel=1e-7, abs=1e-9)
    assert fit.intercept == pytest.approx(b, rel=1e-7, abs=1e-7)
    assert fit.r2 == pytest.approx(1.0, abs=1e-9)
    assert abs(fit.r) == pytest.approx(1.0, abs=1e-9)
    assert np.sign(fit.r) == np.sign(a)
    assert fit.loo_mean_pct == pytest.approx(0.0, abs=1e-6)
    assert fit.loo_max_pct == pytest.approx(0.0, abs=1e-6)


@PROPS
@given(sizes, st.floats(-0.3, 0.3).filter(lambda e: abs(e) > 1e-2), st.floats(0.1, 10.0))
def test_exact_power_law_data_is_recovered(n, e, c):
    s = c * n ** e
    fit = ScalingLaw(n, s).summary()
    assert fit.power_exponent == pytest.approx(e, rel=1e-7, abs=1e-10)
    assert fit.power_coef == pytest.approx(c, rel=1e-6)
    assert fit.power_r2 == pytest.approx(1.0, abs=1e-9)
    assert fit.power_loo_max_pct == pytest.approx(0.0, abs=1e-6)
    assert fit.aic_power <= fit.aic_loglinear


noisy_tables = st.tuples(sizes, st.integers(0, 2 ** 32 - 1)).map(
    lambda p: (p[0], 1.5 - 0.1 * np.log10(p[0]) + np.random.default_rng(p[1]).normal(0, 0.05, p[0].size) + 1.0))


@PROPS
@given(noisy_tables)
def test_r2_at_most_one_and_loo_non_negative(table):
    n, s = table
    fit = ScalingLaw(n, s).summary()
    assert fit.r2 <= 1.0 + 1e-12
    assert fit.power_r2 <= 1.0 + 1e-12
    assert -1.0 - 1e-12 <= fit.r <= 1.0 + 1e-12
    assert fit.r2 == pytest.approx(fit.r ** 2, rel=1e-9, abs=1e-12)
    assert fit.loo_mean_pct >= 0 and fit.loo_max_pct >= fit.loo_mean_pct - 1e-12


@PROPS
@given(st.floats(1e-12, 1e6), st.floats(1e-12, 1e6), st.integers(3, 100), st.integers(0, 5))
def test_aic_decreases_with_rss(rss1, rss2, n, k):
    lo, hi = sorted((rss1, rss2))
    # monotone, and strictly so once the difference survives the logarithm's rounding
    assert aic(lo, n, k) <= aic(hi, n, k)
    if hi > lo * (1 + 1e-9):
        assert aic(lo, n, k) < aic(hi, n, k)


@PROPS
@given(noisy_tables, st.randoms(use_true_random=False))
def test_fits_invariant_to_row_order(table, rnd):
    n, s = table
    perm = list(range(n.size))
    rnd.shuffle(perm)
    a = ScalingLaw(n, s).summary().as_dict()
    b = ScalingLaw(n[perm], s[perm]).summary().as_dict()
    assert a["preferred"] == b["preferred"]
    for key, value in a.items():
        if key == "preferred":
            continue
        assert b[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("n, s, needle", [
    ([1e6, 1e7, np.nan, 1e9], [1, 2, 3, 4], "row 3"),
    ([1e6, 1e7, 1e8, 1e9], [1, np.inf, 3, 4], "row 2"),
    ([1e6, 0.0, 1e8, 1e9], [1, 2, 3, 4], "row 2"),
    ([1e6, 1e7, -1e8, 1e9], [1, 2, 3, 4], "row 3"),
    ([1e6, 1e7, 1e8], [1, 2], "same length"),
    ([1e6, 1e6, 1e7, 1e7], [1, 2, 3, 4], "at least 3 distinct"),
    ([[1e6, 1e7], [1e8, 1e9]], [[1, 2], [3, 4]], "same length"),
])
def test_check_xy_rejects_bad_tables(n, s, needle):
    with pytest.raises(UserError, match=needle):
        check_xy(n, s)
    with pytest.raises(UserError):
        ScalingLaw(n, s)


@PROPS
@given(st.integers(3, 8).flatmap(lambda k: st.tuples(st.just(k), st.integers(0, k - 1),
                                                     st.sampled_from([np.nan, np.inf, -np.inf]),
                                                     st.booleans())))
def test_check_xy_rejects_any_non_finite_cell(case):
    k, i, bad, in_sizes = case
    n = np.logspace(6, 10, k)
    s = np.linspace(1.3, 1.0, k)
    (n if in_sizes else s)[i] = bad
    with pytest.raises(UserError, match=f"row {i + 1}"):
        check_xy(n, s)


def test_check_xy_accepts_good_table():
    n, s = check_xy(PUBLISHED_N, PUBLISHED_S)
    assert n.dtype == float and s.dtype == float
    np.testing.assert_array_equal(n, PUBLISHED_N)


def test_line_fit_rejects_constant_x():
    with pytest.raises(UserError):
        line_fit([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
