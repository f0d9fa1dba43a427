"""Three-phase detection on a measured or simulated sharpness trajectory (numpy/scipy only).

The detector looks only at the series, never at how it was made:

1. drop non-finite points (too many of them -> not decidable), sort by t, rescale t to [0, 1];
2. smooth with a running median then a running mean (window ``smooth`` of the run), which
   removes measurement noise but keeps features wider than the window (restart spikes);
3. *rise*: the smoothed maximum (the peak) is well inside the run
   (``edge`` <= t_peak <= ``latest_peak``) and above the start by ``min_rise`` of the peak;
4. *decay*: the plateau level (median of the raw values in the last ``plateau_window``) is
   below the peak by at least ``min_drop`` of the peak;
5. *plateau*: over that last window the smoothed series stays within a band of
   ``flat_tol`` x (peak - plateau) around the plateau level, and its linear trend across the
   window is inside the same band (a run still decaying, or spiking, has no plateau).

Phase boundaries reported: t_peak, and t_plateau = the first time after the peak at which the
smoothed series enters the plateau band.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import median_filter, uniform_filter1d
from scipy.signal import find_peaks

TAIL_FRACTION = 0.1
"""Final value = mean of the last 10% of checkpoints (the study's definition)."""

PHASE_WINDOWS = ((0.0, 0.2), (0.2, 0.6), (0.6, 1.0 + 1e-9))
"""Fixed windows for phase means: t < 0.2, 0.2 <= t < 0.6, t >= 0.6."""


FINAL_STATISTICS = ("mean", "median")

MIN_POINTS = 10
"""Fewest finite points the three-phase detector reads (a shorter series is undecidable)."""


def final_value(values, fraction: float = TAIL_FRACTION, statistic: str = "mean") -> float:
    """Mean (or median, robust to heavy-tailed measurements) of the last ``fraction`` of
    the finite values (at least one point)."""
    if statistic not in FINAL_STATISTICS:
        raise ValueError(f"statistic must be one of {FINAL_STATISTICS}, got {statistic!r}")
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan")
    k = max(1, int(round(fraction * v.size)))
    return float(np.mean(v[-k:]) if statistic == "mean" else np.median(v[-k:]))


def peak_value(values) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.max(v)) if v.size else float("nan")


def phase_means(t, values) -> tuple[float, float, float]:
    t = np.asarray(t, dtype=float)
    v = np.asarray(values, dtype=float)
    out = []
    for lo, hi in PHASE_WINDOWS:
        sel = (t >= lo) & (t < hi) & np.isfinite(v)
        out.append(float(np.mean(v[sel])) if sel.any() else float("nan"))
    return out[0], out[1], out[2]


def early_mean(t, values, horizon: float) -> float:
    t = np.asarray(t, dtype=float)
    v = np.asarray(values, dtype=float)
    sel = (t <= horizon + 1e-12) & np.isfinite(v)
    return float(np.mean(v[sel])) if sel.any() else float("nan")


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, int(window))
    if window % 2 == 0:
        window += 1
    if window <= 1 or values.size < 3:
        return values.copy()
    return uniform_filter1d(median_filter(values, size=window, mode="nearest"), size=window, mode="nearest")


def _reciprocal_map(eta: np.ndarray, c: float):
    """x -> c/x for the detector's η statistics. A statistic of 0 (a window of mostly
    uphill updates) maps to c / (10⁻³ of the smallest positive η) rather than +inf, so
    that the thresholds stay finite arithmetic."""
    positive = eta[eta > 0]
    floor = 1e-3 * (float(positive.min()) if positive.size else 1.0)
    return lambda x: c / np.maximum(np.asarray(x, dtype=float), floor)


@dataclass
class PhaseResult:
    preserved: bool
    reason: str
    t_peak: float = float("nan")
    t_plateau: float = float("nan")
    peak: float = float("nan")
    plateau: float = float("nan")
    start: float = float("nan")
    n_spikes: int = 0
    decidable: bool = True
    """False when the series cannot be read at all (too few points, too many of them
    non-finite, or no span in t), as opposed to a readable series without the pattern."""

    def as_dict(self) -> dict:
        return asdict(self)


def detect_three_phase(t, values, *, smooth_fraction: float = 0.05, edge: float = 0.02,
                       latest_peak: float = 0.6, min_rise: float = 0.1, min_drop: float = 0.25,
                       plateau_window: float = 0.2, flat_tol: float = 0.25, trend_tol: float = 0.15,
                       min_points: int = MIN_POINTS, max_missing: float = 0.2,
                       reciprocal: float | None = None) -> PhaseResult:
    """Decide whether ``values`` over ``t`` show rise -> decay -> plateau (see module doc).

    ``reciprocal=c``: ``values`` are η (the critical learning rate) and the shape is read
    in c/η (critical sharpness, c = 2). Every statistic is taken on η (the smoothing, the
    plateau's median, the trend fit), where a near-zero η is a small number rather than a
    spike, and then mapped to c/η for the thresholds; η = 0 (an uphill update) is a
    reading, +inf and NaN are missing."""
    t = np.asarray(t, dtype=float)
    v = np.asarray(values, dtype=float)
    if t.shape != v.shape:
        raise ValueError("t and values must have the same shape")
    finite = np.isfinite(t) & np.isfinite(v)
    if v.size == 0 or finite.sum() < min_points:
        return PhaseResult(False, f"too few finite points ({int(finite.sum())} < {min_points})", decidable=False)
    if 1 - finite.mean() > max_missing:
        return PhaseResult(False, f"{100 * (1 - finite.mean()):.0f}% of the points are non-finite", decidable=False)
    order = np.argsort(t[finite], kind="stable")
    t, v = t[finite][order], v[finite][order]
    # Rescale before differencing so that huge but finite t cannot overflow the span.
    t_scale = max(abs(t[0]), abs(t[-1])) or 1.0
    span = t[-1] / t_scale - t[0] / t_scale
    if span <= 0:
        return PhaseResult(False, "all points share one t", decidable=False)
    u = (t / t_scale - t[0] / t_scale) / span
    sm = smooth(v, round(smooth_fraction * v.size))
    if reciprocal is not None:
        to_s = _reciprocal_map(v, reciprocal)
        sm = to_s(sm)
    i_peak = int(np.argmax(sm))
    peak, start = float(sm[i_peak]), float(sm[0])
    scale = abs(peak) if peak != 0 else 1.0
    res = PhaseResult(False, "", t_peak=float(t[i_peak]), peak=peak, start=start)
    window = u >= 1 - plateau_window
    res.plateau = float(np.median(v[window]) if reciprocal is None else to_s(np.median(v[window])))
    if u[i_peak] < edge:
        res.reason = "peak at the start: no rise"
        return res
    if u[i_peak] > latest_peak:
        res.reason = f"peak too late (at {u[i_peak]:.2f} of the run)"
        return res
    if peak - start < min_rise * scale:
        res.reason = "no rise before the peak"
        return res
    gap = peak - res.plateau
    if gap < min_drop * scale:
        res.reason = f"no decay: the end sits within {100 * gap / scale:.0f}% of the peak"
        return res
    band = flat_tol * gap
    after = sm[i_peak + 1:]
    if after.size >= 3:
        spikes, _ = find_peaks(after, prominence=0.1 * gap)
        res.n_spikes = int(spikes.size)
    entered = np.flatnonzero(sm[i_peak:] <= res.plateau + band)
    if entered.size:
        res.t_plateau = float(t[i_peak + entered[0]])
    deviation = float(np.max(np.abs(sm[window] - res.plateau)))
    if deviation > band:
        res.reason = f"no plateau: the last {100 * plateau_window:.0f}% moves by {deviation / gap:.2f} of the drop"
        return res
    tw, vw = u[window], v[window]
    if tw.size >= 4 and np.ptp(tw) > 0:
        # Trend across the window, less two standard errors of the fitted slope: noise
        # alone must not read as "still decaying".
        (slope, icept), cov = np.polyfit(tw, vw, 1, cov="unscaled")
        dof = tw.size - 2
        resid = vw - (slope * tw + icept)
        se = float(np.sqrt(max(cov[0, 0], 0.0) * float(resid @ resid) / dof))
        trend = max(0.0, abs(slope) - 2.0 * se) * np.ptp(tw)
        if reciprocal is not None:  # the fitted η line's change across the window, as c/η
            shrunk = np.sign(slope) * trend / np.ptp(tw)
            ends = np.mean(vw) + shrunk * (np.array([tw.min(), tw.max()]) - np.mean(tw))
            trend = float(abs(np.diff(to_s(ends))[0]))
        if trend > trend_tol * gap:
            res.reason = f"no plateau: still trending by {trend / gap:.2f} of the drop over the last window"
            return res
    res.preserved = True
    return res
