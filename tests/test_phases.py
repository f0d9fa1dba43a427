"""Tests for sharpscope.analysis.phases (three-phase detector and the SPEC section 5 summaries)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sharpscope.analysis.phases import (PHASE_WINDOWS, TAIL_FRACTION, detect_three_phase, early_mean,
                                        final_value, peak_value, phase_means)

PROPS = settings(max_examples=50, deadline=None)

T = np.linspace(0.0, 1.0, 200)


def three_phase(t=T, lo=1.2, hi=2.0, t_peak=0.15, rate=3.0):
    """Linear rise from ``lo`` to ``hi`` until ``t_peak``, then exponential decay back to ``lo``."""
    t = np.asarray(t, dtype=float)
    return np.where(t < t_peak, lo + (hi - lo) * t / t_peak, lo + (hi - lo) * np.exp(-rate * (t - t_peak)))


def detect(t, v, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return detect_three_phase(t, v, **kw)


# --------------------------------------------------------------------------- examples

def test_clean_curve_is_preserved():
    r = detect(T, three_phase())
    assert r.preserved, r.reason
    assert r.reason == ""
    assert r.t_peak == pytest.approx(0.15, abs=0.03)
    assert r.peak == pytest.approx(2.0, abs=0.1)
    assert r.start == pytest.approx(1.2, abs=0.1)
    assert r.plateau == pytest.approx(np.median(three_phase()[T >= 0.8]), abs=1e-12)
    assert r.t_peak < r.t_plateau < 1.0
    assert r.n_spikes == 0


@pytest.mark.parametrize("sigma", [0.01, 0.03, 0.05, 0.07, 0.1])
@pytest.mark.parametrize("seed", range(8))
def test_noisy_curve_is_preserved(seed, sigma):
    v = three_phase() + np.random.default_rng(seed).normal(0.0, sigma, T.size)
    r = detect(T, v)
    assert r.preserved, r.reason
    assert r.t_peak == pytest.approx(0.15, abs=0.05)


@pytest.mark.parametrize("name, values, needle", [
    ("constant", np.full(T.size, 1.5), "peak at the start"),
    ("monotone rising", 1.0 + T, "peak too late"),
    ("monotone decaying", 1.2 + 0.8 * np.exp(-3 * T), "peak at the start"),
    ("late peak (t=0.8)", three_phase(t_peak=0.8), "peak too late"),
    ("slow decay (rate 0.3)", three_phase(rate=0.3), "no decay"),
])
def test_broken_curves_are_not_preserved(name, values, needle):
    r = detect(T, values)
    assert not r.preserved, name
    assert r.reason
    assert needle in r.reason


def test_still_decaying_curve_has_no_plateau():
    # drops far enough to count as a decay, but is still falling steadily over the last 20%
    v = np.where(T < 0.15, 1.2 + 0.8 * T / 0.15, 2.0 - (T - 0.15) / 0.85)
    r = detect(T, v)
    assert not r.preserved
    assert "no plateau" in r.reason


def test_no_rise_before_peak():
    # peak inside the run but barely above the start
    v = np.where(T < 0.2, 2.0 + 0.05 * T / 0.2, 1.2 + 0.85 * np.exp(-5 * (T - 0.2)))
    r = detect(T, v)
    assert not r.preserved
    assert r.reason == "no rise before the peak"


def test_bumps_after_peak_are_counted_as_spikes():
    v = three_phase()
    for centre in (0.4, 0.55, 0.7):  # bumps stay below the main peak
        v = v + 0.3 * np.exp(-0.5 * ((T - centre) / 0.03) ** 2)
    r = detect(T, v)
    assert r.t_peak == pytest.approx(0.15, abs=0.03)
    assert r.n_spikes == 3
    assert detect(T, three_phase()).n_spikes == 0


def test_bumps_in_the_last_window_break_the_plateau():
    v = three_phase()
    for centre in (0.3, 0.55, 0.8, 0.92):
        v = v + 0.3 * np.exp(-0.5 * ((T - centre) / 0.02) ** 2)
    r = detect(T, v)
    assert not r.preserved
    assert "no plateau" in r.reason


# --------------------------------------------------------------------------- input handling

@pytest.mark.parametrize("n", [0, 1, 5, 9])
def test_short_input_is_not_decidable(n):
    t = np.linspace(0, 1, n)
    r = detect(t, three_phase(t))
    assert not r.preserved
    assert "too few finite points" in r.reason
    # a series too short to read is undecidable (a claim leaves it out), not a run
    # without the pattern
    assert not r.decidable


def test_mostly_nan_input_is_not_decidable():
    v = three_phase().copy()
    v[::3] = np.nan  # a third missing
    r = detect(T, v)
    assert not r.preserved
    assert "non-finite" in r.reason and not r.decidable


def test_a_few_nans_are_dropped():
    v = three_phase().copy()
    v[[5, 50, 150]] = np.nan
    v[100] = np.inf
    r = detect(T, v)
    assert r.preserved, r.reason


def test_all_points_at_one_t():
    r = detect(np.zeros(20), np.arange(20.0))
    assert not r.preserved
    assert r.reason


def test_shape_mismatch_raises_value_error():
    with pytest.raises(ValueError):
        detect_three_phase(np.arange(5.0), np.arange(6.0))


any_float = st.floats(allow_nan=True, allow_infinity=True)


@PROPS
@given(st.integers(0, 50).flatmap(lambda n: st.tuples(st.lists(any_float, min_size=n, max_size=n),
                                                      st.lists(any_float, min_size=n, max_size=n))))
def test_never_raises_on_arbitrary_floats(tv):
    t, v = (np.asarray(a, dtype=float) for a in tv)
    r = detect(t, v)
    assert isinstance(r.preserved, bool)
    if not r.preserved:
        assert r.reason
    finite = np.isfinite(t) & np.isfinite(v)
    if finite.sum() < 10 or (t.size and 1 - finite.mean() > 0.2):
        assert not r.preserved


@PROPS
@given(st.lists(any_float, min_size=0, max_size=50))
def test_never_raises_on_arbitrary_values_over_a_grid(values):
    v = np.asarray(values, dtype=float)
    r = detect(np.linspace(0, 1, v.size), v)
    assert isinstance(r.preserved, bool)
    if not r.preserved:
        assert r.reason


def test_overflowing_t_span_does_not_raise():
    # finite t whose difference overflows (t[-1] - t[0] = inf) once emptied the plateau window
    t = np.array([0.0] * 10 + [9.9792015476736e291, -1.7976931348623157e308])
    v = np.array([0.0] * 10 + [1.0, 0.0])
    r = detect(t, v)
    assert not r.preserved and r.reason


def test_huge_t_range_still_detects():
    t = np.linspace(-1.0, 1.0, T.size) * 1.7e308  # t[-1] - t[0] overflows
    r = detect(t, three_phase())
    ref = detect(T, three_phase())
    assert r.preserved, r.reason
    assert r.peak == ref.peak and r.plateau == ref.plateau


# --------------------------------------------------------------------------- invariances

curves = st.fixed_dictionaries({
    "t_peak": st.floats(0.05, 0.9),
    "rate": st.floats(0.2, 8.0),
    "lo": st.floats(0.5, 1.5),
    "hi": st.floats(1.0, 3.0),
    "sigma": st.sampled_from([0.0, 0.01, 0.03, 0.08]),
    "seed": st.integers(0, 2 ** 32 - 1),
    # no grid point exactly on a window edge (u = 0.02, 0.6, 0.8): there a 1-ulp change of t
    # legitimately moves the point across the edge, which would make the t-invariance flaky
    "n": st.integers(10, 200).filter(lambda n: (n - 1) % 5 != 0),
})


def make_curve(p):
    t = np.linspace(0.0, 1.0, p["n"])
    v = three_phase(t, lo=p["lo"], hi=p["hi"], t_peak=p["t_peak"], rate=p["rate"])
    return t, v + np.random.default_rng(p["seed"]).normal(0.0, p["sigma"], t.size)


def same_result(a, b):
    da, db = a.as_dict(), b.as_dict()
    assert da.keys() == db.keys()
    for k in da:
        x, y = da[k], db[k]
        if isinstance(x, float) and math.isnan(x):
            assert isinstance(y, float) and math.isnan(y), k
        else:
            assert x == y, k


@PROPS
@given(curves, st.randoms(use_true_random=False))
def test_invariant_to_shuffling_pairs(p, rnd):
    t, v = make_curve(p)
    perm = list(range(t.size))
    rnd.shuffle(perm)
    same_result(detect(t, v), detect(t[perm], v[perm]))


@PROPS
@given(st.lists(any_float, min_size=0, max_size=50), st.randoms(use_true_random=False))
def test_invariant_to_shuffling_arbitrary_values(values, rnd):
    v = np.asarray(values, dtype=float)
    t = np.arange(v.size, dtype=float)
    perm = list(range(v.size))
    rnd.shuffle(perm)
    same_result(detect(t, v), detect(t[perm], v[perm]))


@PROPS
@given(curves, st.floats(1e-3, 1e3))
def test_invariant_to_positive_rescaling_of_values(p, c):
    t, v = make_curve(p)
    a, b = detect(t, v), detect(t, c * v)
    assert a.preserved == b.preserved, (a.reason, b.reason)
    assert a.t_peak == b.t_peak
    if a.preserved:
        assert b.peak == pytest.approx(c * a.peak, rel=1e-9)
        assert b.plateau == pytest.approx(c * a.plateau, rel=1e-9)


@PROPS
@given(curves, st.floats(1e-3, 1e3), st.floats(-1e3, 1e3))
def test_invariant_to_affine_rescaling_of_t(p, scale, shift):
    t, v = make_curve(p)
    a, b = detect(t, v), detect(scale * t + shift, v)
    assert a.preserved == b.preserved, (a.reason, b.reason)
    assert a.n_spikes == b.n_spikes
    assert b.t_peak == pytest.approx(scale * a.t_peak + shift, rel=1e-9, abs=1e-9 * scale)


# --------------------------------------------------------------------------- summaries

def test_final_value_is_mean_of_last_ten_percent():
    assert TAIL_FRACTION == 0.1
    v = three_phase() + np.random.default_rng(0).normal(0, 0.03, 200)
    assert final_value(v) == pytest.approx(np.mean(v[-20:]), rel=1e-12)
    assert final_value(v) != pytest.approx(np.mean(v[-21:]), rel=1e-12)
    assert final_value(np.arange(200.0)) == pytest.approx(np.mean(np.arange(180.0, 200.0)))


def test_final_value_edge_cases():
    assert final_value([3.0]) == 3.0
    assert final_value([1.0, 2.0, 3.0]) == 3.0  # at least one point
    assert math.isnan(final_value([]))
    assert math.isnan(final_value([np.nan, np.inf]))
    # non-finite points are dropped before taking the tail
    v = np.r_[np.arange(20.0), np.nan]
    assert final_value(v) == pytest.approx(np.mean([18.0, 19.0]))


def test_peak_value():
    assert peak_value([1.0, np.nan, 3.0, np.inf, 2.0]) == 3.0
    assert math.isnan(peak_value([np.nan]))


def test_phase_means_windows():
    assert PHASE_WINDOWS[0] == (0.0, 0.2) and PHASE_WINDOWS[1] == (0.2, 0.6)
    t = np.array([0.0, 0.1, 0.19, 0.2, 0.4, 0.59, 0.6, 0.8, 1.0])
    v = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 100.0, 200.0, 300.0])
    early, mid, late = phase_means(t, v)
    assert early == pytest.approx(2.0)      # t < 0.2
    assert mid == pytest.approx(20.0)       # 0.2 <= t < 0.6
    assert late == pytest.approx(200.0)     # t >= 0.6, t = 1 included


def test_phase_means_on_the_study_grid():
    v = three_phase()
    early, mid, late = phase_means(T, v)
    assert early == pytest.approx(v[T < 0.2].mean())
    assert mid == pytest.approx(v[(T >= 0.2) & (T < 0.6)].mean())
    assert late == pytest.approx(v[T >= 0.6].mean())
    assert (T < 0.2).sum() + ((T >= 0.2) & (T < 0.6)).sum() + (T >= 0.6).sum() == 200


def test_phase_means_ignore_nan_and_empty_windows():
    t = np.array([0.0, 0.1, 0.7, 0.9])
    v = np.array([1.0, np.nan, 5.0, 7.0])
    early, mid, late = phase_means(t, v)
    assert early == 1.0
    assert math.isnan(mid)
    assert late == 6.0


def test_early_mean():
    v = np.arange(200.0)
    assert early_mean(T, v, 0.1) == pytest.approx(np.mean(v[T <= 0.1]))
    assert (T <= 0.1).sum() == 20
    assert early_mean(T, v, 0.2) == pytest.approx(np.mean(v[:40]))
    assert early_mean([0.0, 0.1, 0.2], [1.0, np.nan, 3.0], 0.2) == 2.0  # horizon inclusive
    assert math.isnan(early_mean([0.5, 0.6], [1.0, 2.0], 0.1))


def test_final_value_statistics():
    v = [1.0] * 90 + [1.0, 2.0, 3.0, 100.0, 4.0, 5.0, 6.0, 7.0, 8.0, float("nan")]
    tail = np.array([x for x in v if np.isfinite(x)])[-10:]
    assert final_value(v) == pytest.approx(tail.mean())
    assert final_value(v, statistic="median") == pytest.approx(np.median(tail))
    with pytest.raises(ValueError):
        final_value(v, statistic="mode")


# --------------------------------------------------------------------------- η-space reading

def test_reciprocal_reads_the_shape_of_two_over_eta():
    # a clean three-phase λ curve, handed to the detector as η = 2/λ
    lam = three_phase()
    r = detect(T, 2.0 / lam, reciprocal=2.0)
    assert r.preserved, r.reason
    assert r.t_peak == pytest.approx(0.15, abs=0.03)
    assert r.peak == pytest.approx(2.0, abs=0.1) and r.plateau == pytest.approx(lam[T >= 0.8].min(), rel=0.05)


def test_reciprocal_counts_eta_zero_and_is_not_moved_by_spikes():
    lam = three_phase()
    eta = 2.0 / lam
    rng = np.random.default_rng(1)
    spiky = eta.copy()
    hit = rng.choice(np.arange(10, 200), 12, replace=False)
    spiky[hit[:6]] = 1e-7   # λ_c spikes of 2·10⁷
    spiky[hit[6:]] = 0.0    # not_descent: a reading, not missing
    r = detect(T, spiky, reciprocal=2.0)
    assert r.decidable and r.preserved, r.reason
    assert r.peak == pytest.approx(2.0, rel=0.1)  # the smoothed η sets the peak, not a 2·10⁷ spike


def test_reciprocal_still_decaying_has_no_plateau():
    lam = np.where(T < 0.15, 1.0 + T / 0.15, 2.0 - 0.9 * (T - 0.15) / 0.85)  # falls to the very end
    r = detect(T, 2.0 / lam, reciprocal=2.0)
    assert not r.preserved and "no plateau" in r.reason
