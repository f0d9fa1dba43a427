"""Critical sharpness read in the space it is measured in: the critical learning rate η_c.

A line search measures η_c, and λ_c = 2/η_c is its reciprocal. η_c is a noisy quantity
whose noise reaches zero: as the probe's descent gᵀd approaches 0⁺, λ_c explodes (single
values a hundred times their neighbours), and once gᵀd < 0 the search ends
``not_descent``, which is η_c = 0 (λ_c = ∞), a measurement rather than a missing value.
Averaging λ_c lets a few near-zero η_c dominate and drops the η_c = 0 outcomes; averaging
η_c and reporting 2/⟨η_c⟩ weighs every measurement by the step size it allows. So, for a
run whose critical sharpness comes from a line search, every summary of it (final window,
peak, phase means, early means, the smoothed curve, the three-phase detector, seed
averages) is taken on η_c and mapped back with λ = 2/η.

This module is the one place that turns a run's rows into that series. Per measurement:

* ``ok``: the logged η_c (``sharpness/eta_c``; 2/λ_c when only λ_c is logged);
* ``not_descent``: η_c = 0, counted in every statistic;
* ``no_increase``: the loss never rose up to the search's ``eta_max``: η_c lies beyond the
  range searched (λ_c ≈ 0). Its value is a bound, not a reading, and as +∞ it would
  turn every window holding one into λ_c = 0, so it is left out of every statistic (like
  a missing point) and counted among the failures;
* any other failure (``max_evals``, ``zero_direction``, ``nonfinite_loss``) or a null
  without a reason: missing, left out.

Which runs: those whose metrics log ``sharpness/eta_c`` beside a record of the line
search (``sharpness/evals``, or a ``sharpness/failed/<status>`` key). The simulated study
logs η_c as 2/λ_c of its closed-form trajectory, without a search; it keeps its λ-space
summaries, and with them the published numbers it reproduces.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..metrics import CRITICAL, ETA_C, ETA_C_SE, EVALS, FAILED_PREFIX
from ..runs import Run
from ..signals.phase import SHARPNESS_PER_ETA  # λ_c = 2/η_c, one constant for the live reader and this

OK, NOT_DESCENT, NO_INCREASE, MISSING = "ok", "not_descent", "no_increase", "missing"
PEAK_MIN_POINTS = 3
"""Fewest measurements in a window (final, peak, smoothed curve): one spike alone is not a
peak, and one uphill update alone is not a final value."""
BOOTSTRAP_DRAWS = 200
INTERVAL = 0.9
"""Central coverage of the smoothed curve's interval (a percentile bootstrap of each
window's statistic)."""


@dataclass(frozen=True)
class EtaSeries:
    """Every critical-sharpness measurement of one run, in training order."""

    t: np.ndarray
    eta: np.ndarray
    """η_c: the measurement, 0 for not_descent, +inf for no_increase, NaN when missing."""
    status: np.ndarray
    """Per measurement: "ok", "not_descent", "no_increase", another failure's status, or
    "missing" (null without a recorded reason)."""
    eta_se: np.ndarray
    """Standard error of each η_c where the writer logs it, else NaN."""

    @property
    def used(self) -> np.ndarray:
        """The measurements every statistic reads: finite η_c (ok and not_descent)."""
        return np.isfinite(self.eta)

    @property
    def sharpness(self) -> np.ndarray:
        """λ_c = 2/η_c of each measurement: +inf for not_descent, 0 for no_increase."""
        return to_sharpness(self.eta)

    def counts(self) -> dict[str, int]:
        values, n = np.unique(self.status, return_counts=True)
        return {str(v): int(k) for v, k in zip(values, n)}


def to_sharpness(eta) -> np.ndarray | float:
    """2/η elementwise: η = 0 gives +inf, η = +inf gives 0, NaN stays NaN."""
    eta = np.asarray(eta, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = SHARPNESS_PER_ETA / eta
    return float(out) if out.ndim == 0 else out


def is_line_search(run: Run) -> bool:
    """Whether the run's critical sharpness comes from a line search (see module doc)."""
    keys = run.keys()
    return ETA_C in keys and (EVALS in keys or any(k.startswith(FAILED_PREFIX) for k in keys))


def eta_series(run: Run) -> EtaSeries | None:
    """The run's η_c series (None when its critical sharpness is not from a line search)."""
    if not is_line_search(run):
        return None
    last_step = max((row["step"] for row in run.metrics), default=0) or 1
    t, eta, status, se = [], [], [], []
    for row in run.metrics:
        failed = sorted(k[len(FAILED_PREFIX):] for k, v in row.items() if k.startswith(FAILED_PREFIX) and v)
        if not (failed or ETA_C in row or CRITICAL in row):
            continue
        t.append(float(row["t"]) if row.get("t") is not None else row["step"] / last_step)
        value, lam = _number(row.get(ETA_C)), _number(row.get(CRITICAL))
        if failed:
            status.append(failed[0])
            eta.append({NOT_DESCENT: 0.0, NO_INCREASE: np.inf}.get(failed[0], np.nan))
        elif np.isfinite(value) and value >= 0:
            status.append(OK)
            eta.append(value)
        elif np.isfinite(lam) and lam > 0:
            status.append(OK)
            eta.append(SHARPNESS_PER_ETA / lam)
        else:
            status.append(MISSING)
            eta.append(np.nan)
        se.append(_number(row.get(ETA_C_SE)))
    order = np.argsort(np.asarray(t, dtype=float), kind="stable")
    return EtaSeries(np.asarray(t, dtype=float)[order], np.asarray(eta, dtype=float)[order],
                     np.asarray(status, dtype=object)[order], np.asarray(se, dtype=float)[order])


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


# --- statistics of η_c, reported as sharpness ---------------------------------------------

def _stat(values: np.ndarray, statistic: str) -> float:
    return float(np.mean(values) if statistic == "mean" else np.median(values))


def window_sharpness(eta, statistic: str = "mean") -> float:
    """2 / (mean or median of the finite η_c): the sharpness of a window of measurements."""
    v = np.asarray(eta, dtype=float)
    v = v[np.isfinite(v)]
    return to_sharpness(_stat(v, statistic)) if v.size else float("nan")


def tail_size(n: int, fraction: float) -> int:
    """Points in the final window: ``fraction`` of ``n`` (the study's rule), but at least
    :data:`PEAK_MIN_POINTS` (at most ``n``): in η-space one uphill update alone would read
    λ_c = ∞ for a whole short run."""
    return min(n, max(PEAK_MIN_POINTS, int(round(fraction * n))))


def final_sharpness(eta, fraction: float, statistic: str = "mean") -> float:
    """2 / statistic of η_c over the last ``fraction`` of the finite measurements."""
    v = np.asarray(eta, dtype=float)
    v = v[np.isfinite(v)]
    return window_sharpness(v[-tail_size(v.size, fraction):], statistic) if v.size else float("nan")


def smoothing_window(n: int, fraction: float) -> int:
    """Points in a window of the smoothed curve and the peak: ``fraction`` of ``n``, odd
    (so that it centres on a point), at least :data:`PEAK_MIN_POINTS`, at most ``n``."""
    k = max(PEAK_MIN_POINTS, int(round(fraction * n)))
    return min(n, k + 1 - k % 2)


def peak_sharpness(eta, fraction: float, statistic: str = "mean") -> float:
    """The highest sharpness of any :func:`smoothing_window` of consecutive finite
    measurements (the top of the smoothed curve away from its ends) or of the final window
    (so the peak is never below the final value): a peak is a level held over several
    measurements, not one spike."""
    v = np.asarray(eta, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    k = smoothing_window(v.size, fraction)
    windows = np.lib.stride_tricks.sliding_window_view(v, k)
    stats = windows.mean(axis=1) if statistic == "mean" else np.median(windows, axis=1)
    final = _stat(v[-tail_size(v.size, fraction):], statistic)
    return to_sharpness(min(float(np.min(stats)), final))


def windows_sharpness(t, eta, windows, statistic: str = "mean") -> tuple[float, ...]:
    """2 / statistic of η_c within each [lo, hi) window of t (NaN for an empty window)."""
    t, v = np.asarray(t, dtype=float), np.asarray(eta, dtype=float)
    return tuple(window_sharpness(v[(t >= lo) & (t < hi)], statistic) for lo, hi in windows)


@dataclass(frozen=True)
class SmoothedCurve:
    """A rolling statistic of a series, with a percentile-bootstrap interval per point."""

    t: np.ndarray
    center: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    window: int


def smoothed_curve(t, values, *, reciprocal: bool, fraction: float = 0.1, statistic: str = "mean",
                   interval: bool = True, seed: int = 0) -> SmoothedCurve:
    """The rolling ``statistic`` over centred :func:`smoothing_window` windows of the finite
    points (shorter at the ends), with the central
    :data:`INTERVAL` of its bootstrap distribution.

    ``reciprocal``: ``values`` are η_c and the curve is 2/statistic(η_c) (its interval
    mapped the same way: an interval reaching η = 0 reaches λ = ∞); otherwise the curve is
    the statistic of the values themselves."""
    t, v = np.asarray(t, dtype=float), np.asarray(values, dtype=float)
    keep = np.isfinite(t) & np.isfinite(v)
    t, v = t[keep], v[keep]
    n = v.size
    half = smoothing_window(n, fraction) // 2 if n else 0
    center, lo, hi = (np.full(n, np.nan) for _ in range(3))
    rng = np.random.default_rng(seed)
    q = (50 * (1 - INTERVAL), 50 * (1 + INTERVAL))
    for i in range(n):
        w = v[max(0, i - half):i + half + 1]
        center[i] = _stat(w, statistic)
        if interval and w.size > 1:
            draws = w[rng.integers(0, w.size, size=(BOOTSTRAP_DRAWS, w.size))]
            boot = draws.mean(axis=1) if statistic == "mean" else np.median(draws, axis=1)
            lo[i], hi[i] = np.percentile(boot, q)
    if reciprocal:  # 2/x reverses the order: the upper sharpness comes from the lower η
        center, lo, hi = to_sharpness(center), to_sharpness(hi), to_sharpness(lo)
    return SmoothedCurve(t, np.atleast_1d(center), np.atleast_1d(lo), np.atleast_1d(hi), 2 * half + 1)
