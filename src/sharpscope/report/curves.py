"""How a sharpness trajectory is drawn, in every figure that shows one.

Measured critical sharpness is a reciprocal of a noisy η_c: single values spike by two
decades and uphill updates (``not_descent``) have no finite λ_c at all. Plotted as a plain
line on a linear axis, a few spikes set the scale and the failures leave silent gaps. So a
trajectory is drawn as

* its single measurements, faint;
* the smoothed curve (:func:`~sharpscope.analysis.etaspace.smoothed_curve`: for a
  line-search run 2/⟨η_c⟩ over a rolling window, not_descent counted as η_c = 0) with its
  bootstrap interval shaded;
* its stability line (2/lr for λ_c and λ_max, Adam's 38/lr for the preconditioned λ_max);
* ▲ at the top edge for each not_descent measurement (η_c = 0, λ_c = ∞: off the top of
  any axis), ▼ at the bottom edge for no_increase (λ_c ≈ 0), × at the bottom edge for a
  measurement without a value (no bracket, or a null without a reason);
* on a log axis when what is drawn spans more than a decade.

Artists carry a ``gid`` (``raw``, ``smoothed``, ``interval``, ``stability-line``,
``not_descent``, ``no_increase``, ``failed``) so that tests can read a figure's structure.
"""

from __future__ import annotations

import numpy as np
from matplotlib.lines import Line2D

from ..analysis.etaspace import NO_INCREASE, NOT_DESCENT, OK, smoothed_curve
from ..analysis.phases import TAIL_FRACTION
from ..analysis.summaries import RunSummary, lr_series
from ..metrics import CRITICAL, LAMBDA_MAX, PRECONDITIONED, TRACE_PER_PARAM

T_LABEL = "training progress t (fraction of the run's steps)"
LOSS_LABEL = "loss (nats/token)"
SHARPNESS_LABELS = {
    CRITICAL: "critical sharpness λ_c = 2/η_c (1/lr)",
    LAMBDA_MAX: "λ_max, top Hessian eigenvalue (1/lr)",
    TRACE_PER_PARAM: "tr(H) / P (per parameter)",
    PRECONDITIONED: "preconditioned λ_max (1/lr)",
}
# Stability lines: gradient descent's 2/lr for λ_c and λ_max, and Adam's
# (2 + 2β1)/((1 − β1)·lr) = 38/lr at β1 = 0.9 for the preconditioned Hessian.
STABILITY_LINES = {
    CRITICAL: (2.0, "2/lr (edge of stability)"),
    LAMBDA_MAX: (2.0, "2/lr"),
    PRECONDITIONED: (38.0, "38/lr (Adam, β1 = 0.9)"),
}
DECADE = 10.0
"""Log axis when the largest value drawn is more than this times the smallest."""


def sharpness_label(key: str) -> str:
    return SHARPNESS_LABELS.get(key, key)


def _sorted(t: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(t, kind="stable")
    return np.asarray(t, dtype=float)[order], np.asarray(v, dtype=float)[order]


def edge_marks(ax, t, *, where: str, marker: str, color, gid: str, row: int = 0, label: str | None = None) -> None:
    """Marks at the top or bottom edge of ``ax`` at times ``t`` (one row per run)."""
    t = np.asarray(t, dtype=float)
    if not t.size:
        return
    y = 0.975 - 0.03 * row if where == "top" else 0.025 + 0.03 * row
    (line,) = ax.plot(t, np.full(t.size, y), marker, ls="", ms=5, color=color, alpha=0.9, clip_on=False,
                      transform=ax.get_xaxis_transform(), label=label)
    line.set_gid(gid)


def stability_line(ax, run, key: str, *, color="k", label: str | None = None) -> np.ndarray:
    """The measure's stability line over t (nothing for a measure without one, or a run
    without an lr); returns the values drawn."""
    if key not in STABILITY_LINES:
        return np.array([])
    factor, default = STABILITY_LINES[key]
    t_lr, lr = lr_series(run)
    with np.errstate(divide="ignore", invalid="ignore"):
        tl, line = _sorted(t_lr, np.where(lr > 0, factor / lr, np.nan))
    keep = np.isfinite(line)
    if not keep.any():
        return np.array([])
    (artist,) = ax.plot(tl[keep], line[keep], ls="--", lw=1, color=color, alpha=0.8,
                        label=default if label is None else label)
    artist.set_gid("stability-line")
    return line[keep]


def trajectory(ax, r: RunSummary, *, color, label: str | None = None, statistic: str = "mean", row: int = 0,
               key: str = CRITICAL) -> np.ndarray:
    """One run's sharpness (the run's analysed metric, ``key``) drawn as the module doc
    says; returns the finite values drawn (for the axis' scale)."""
    if r.eta is not None:
        t, status = r.eta.t, r.eta.status
        lam = np.where(status == NO_INCREASE, np.nan, r.eta.sharpness)  # λ_c ≈ 0: marked, not plotted
        curve = smoothed_curve(t[r.eta.used], r.eta.eta[r.eta.used], reciprocal=True, fraction=TAIL_FRACTION,
                               statistic=statistic)
    else:
        t, lam = _sorted(r.t, r.sharpness)
        status = np.where(np.isfinite(lam), OK, "missing")
        curve = smoothed_curve(t, lam, reciprocal=False, fraction=TAIL_FRACTION, statistic=statistic)
    finite = np.isfinite(lam)
    shown = [lam[finite]]
    raw = ax.scatter(t[finite], lam[finite], s=7, color=color, alpha=0.3, linewidths=0)
    raw.set_gid("raw")
    if curve.t.size:
        (line,) = ax.plot(curve.t, curve.center, color=color, lw=1.6, label=label)
        line.set_gid("smoothed")
        shown.append(curve.center[np.isfinite(curve.center)])
        band = ax.fill_between(curve.t, curve.lower, curve.upper, color=color, alpha=0.15, linewidth=0)
        band.set_gid("interval")
    edge_marks(ax, t[status == NOT_DESCENT], where="top", marker="^", color=color, gid="not_descent", row=row)
    edge_marks(ax, t[status == NO_INCREASE], where="bottom", marker="v", color=color, gid="no_increase", row=row)
    other = ~finite & (status != NOT_DESCENT) & (status != NO_INCREASE)
    edge_marks(ax, t[other], where="bottom", marker="x", color=color, gid="failed", row=row)
    return np.concatenate(shown)


def scale_axis(ax, *arrays) -> None:
    """Log y when every finite value drawn is positive and they span more than a decade;
    limits from the values (not the shaded intervals, which may reach λ = ∞)."""
    values = np.concatenate([np.asarray(v, dtype=float).ravel() for v in arrays]) if arrays else np.array([])
    values = values[np.isfinite(values)]
    if not values.size:
        return
    lo, hi = float(values.min()), float(values.max())
    if lo > 0 and hi / lo > DECADE:
        ax.set_yscale("log")
        ax.set_ylim(lo / 1.6, hi * 1.6)
    elif hi > lo:
        pad = 0.08 * (hi - lo)
        ax.set_ylim(lo - pad, hi + pad)


def style_legend(ax, *, stability: str | None, has_not_descent: bool, has_failed: bool, loc: str = "lower right",
                 eta_space: bool = True) -> None:
    """A legend of what the marks mean (colours are named by the other legend)."""
    grey = "0.35"
    curve = "smoothed 2/⟨η_c⟩, 90% interval" if eta_space else "smoothed, 90% interval"
    handles = [Line2D([], [], color=grey, marker="o", ls="", ms=3, alpha=0.4, label="single measurements"),
               Line2D([], [], color=grey, lw=1.6, label=curve)]
    if stability:
        handles.append(Line2D([], [], color="k", ls="--", lw=1, label=stability))
    if has_not_descent:
        handles.append(Line2D([], [], color=grey, marker="^", ls="", ms=5, label="not_descent: uphill update (λ_c = ∞)"))
    if has_failed:
        handles.append(Line2D([], [], color=grey, marker="x", ls="", ms=5, label="no value (search failed)"))
    legend = ax.legend(handles=handles, fontsize=7, loc=loc, framealpha=0.85)
    ax.add_artist(legend)


def marks_present(runs: list[RunSummary]) -> tuple[bool, bool]:
    """(any not_descent, any other failure) among the runs' measurements."""
    nd = any(r.eta is not None and bool((r.eta.status == NOT_DESCENT).any()) for r in runs)
    other = any((r.eta is not None and bool((~r.eta.used & (r.eta.status != NOT_DESCENT)).any()))
                or (r.eta is None and bool((~np.isfinite(r.sharpness)).any())) for r in runs)
    return nd, other
