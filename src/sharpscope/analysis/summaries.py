"""What the analysis reads of each run, how runs are grouped, and the result it fills.

The lowest layer of the study analysis: :mod:`.claims`, :mod:`.study` and :mod:`.runset`
all build on it, so nothing here imports them. Runs are grouped by their config's
``group`` ("scales" when absent); runs of one ``model`` (other seeds) are averaged
(:func:`by_model`, :func:`finite_mean`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import UserError
from ..runs import Run
from .etaspace import (OK, SHARPNESS_PER_ETA, EtaSeries, eta_series, final_sharpness,
                       peak_sharpness, to_sharpness, window_sharpness, windows_sharpness)
from .fits import ScalingLaw, pearson
from .phases import (PHASE_WINDOWS, TAIL_FRACTION, PhaseResult, detect_three_phase, early_mean, final_value,
                     peak_value, phase_means)
from ..metrics import (ACC_PREFIX, CRITICAL, EVAL_LOSS, EVAL_PREFIX, FAILED_PREFIX, LAMBDA_MAX,
                       TRACE_PER_PARAM, TRAIN_GRAD_NORM, TRAIN_LOSS, TWO_OVER_LR)

MEASURES = {"critical": CRITICAL, "lambda_max": LAMBDA_MAX, "trace_per_param": TRACE_PER_PARAM}
STABILITY_FROM = 0.1
"""Where a run is read against the 2/lr line: after warmup and the first rise (t ≥ 0.1)."""


@dataclass
class AnalysisOptions:
    metric: str = CRITICAL
    """The sharpness series the study is about."""
    pac_m: float = 1e5
    """Sample count m of the PAC-Bayes bound."""
    pac_delta: float = 0.05
    """Confidence parameter delta of the PAC-Bayes bound."""
    extrapolate: tuple[float, ...] | None = None
    """Sizes to extrapolate to when the study has no extrapolation runs (None: the
    simulated study's 13B, 30B and 70B in a study; no extrapolation in a report of
    arbitrary runs, whose sizes have nothing to do with those)."""
    early_horizons: tuple[float, ...] = (0.1, 0.2)
    final_statistic: str = "mean"
    """How the final window (last 10% of points) is summarised: "mean" (the simulated
    study's definition) or "median" (robust to the heavy tails of measured λ_c). For a
    line-search run it is the statistic of η_c over the window, reported as 2/η."""
    eta_space: bool = True
    """Summarise line-search critical sharpness on η_c (:mod:`.etaspace`); False reads λ_c
    directly, as earlier versions did (kept to compare the two readings)."""


@dataclass
class RunSummary:
    """What the analysis needs of one run, computed once."""

    run: Run
    t: np.ndarray
    sharpness: np.ndarray
    peak: float
    final: float
    final_loss: float
    accuracy: dict[str, float]
    phases: PhaseResult
    phase_means: tuple[float, float, float]
    r_loss: float
    r_grad: float
    measure_finals: dict[str, float]
    measure_r: dict[str, float]
    early: dict[float, float]
    final_val_loss: float = float("nan")
    val_losses: dict[str, float] = field(default_factory=dict)
    """Last validation loss per source (``eval/<source>/loss``)."""
    edge_ratio: float = float("nan")
    """Median of λ_c / (2/lr) for t ≥ 0.1: 1 is the edge of stability."""
    frac_above_edge: float = float("nan")
    """Fraction of measurements (t ≥ 0.1) with λ_c above 2/lr."""
    failed_share: float = 0.0
    """Share of the sharpness measurements that are null (no bracket found)."""
    failed_reasons: dict[str, int] = field(default_factory=dict)
    """Count per ``sharpness/failed/<status>`` key."""
    eta: EtaSeries | None = None
    """The η_c series when the metric is line-search critical sharpness read in η-space
    (:mod:`.etaspace`): then every summary above is 2/statistic(η_c), not_descent counts as
    η_c = 0, and ``sharpness`` still holds the logged λ_c (NaN on failures) for display."""

    @property
    def measured_points(self) -> int:
        """Measurements the statistics read: finite λ, or finite η_c (with not_descent)."""
        return int(self.eta.used.sum() if self.eta is not None else np.isfinite(self.sharpness).sum())

    @property
    def mean_accuracy(self) -> float:
        return float(np.mean(list(self.accuracy.values()))) if self.accuracy else float("nan")


def _correlation(t_a: np.ndarray, a: np.ndarray, t_b: np.ndarray, b: np.ndarray) -> float:
    """Pearson r of two series on the points (same t) that both log."""
    _, ia, ib = np.intersect1d(t_a, t_b, return_indices=True)
    return pearson(a[ia], b[ib])


def _accuracy_tasks(run: Run) -> dict[str, float]:
    """Downstream accuracies: ``eval/acc/<task>`` and trained runs' ``eval/<task>/accuracy``."""
    out = {}
    for key in sorted(run.keys()):
        if key.startswith(ACC_PREFIX):
            out[key[len(ACC_PREFIX):]] = run.last(key)
        elif key.startswith(EVAL_PREFIX) and key.endswith("/accuracy") and key.count("/") == 2:
            out[key.split("/")[1]] = run.last(key)
    return {k: v for k, v in out.items() if math.isfinite(v)}


def _edge_of_stability(t: np.ndarray, s: np.ndarray, t_lr: np.ndarray, lr: np.ndarray) -> tuple[float, float]:
    """(median λ_c·lr/2, fraction above 1) over t ≥ STABILITY_FROM, on points logging both."""
    _, i_s, i_lr = np.intersect1d(t, t_lr, return_indices=True)
    ratio = s[i_s] * lr[i_lr] / 2.0
    keep = (t[i_s] >= STABILITY_FROM) & np.isfinite(ratio)
    if not keep.any():
        return float("nan"), float("nan")
    return float(np.median(ratio[keep])), float(np.mean(ratio[keep] > 1.0))


def lr_series(run: Run) -> tuple[np.ndarray, np.ndarray]:
    """``(t, lr)``: the logged ``lr``, or 2 / ``sharpness/two_over_lr`` for writers that log
    only the stability line beside each measurement."""
    t_lr, lr = run.series("lr")
    if t_lr.size:
        return t_lr, lr
    t_two, two_over_lr = run.series(TWO_OVER_LR)
    with np.errstate(divide="ignore", invalid="ignore"):
        return t_two, np.where(two_over_lr > 0, 2.0 / two_over_lr, np.nan)


def _eta_edge(eta: EtaSeries, t_lr: np.ndarray, lr: np.ndarray) -> tuple[float, float]:
    """(median lr/η_c, fraction above 1) over t ≥ STABILITY_FROM: the edge ratio λ_c·lr/2
    with an uphill update (η_c = 0) counted as past the edge."""
    _, i_e, i_lr = np.intersect1d(eta.t, t_lr, return_indices=True)
    e, step = eta.eta[i_e], lr[i_lr]
    keep = (eta.t[i_e] >= STABILITY_FROM) & np.isfinite(e) & np.isfinite(step)
    if not keep.any():
        return float("nan"), float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(e[keep] > 0, step[keep] / np.where(e[keep] > 0, e[keep], 1.0), np.inf)
    return float(np.median(ratio)), float(np.mean(ratio > 1.0))


def _eta_correlation(eta: EtaSeries, t_b: np.ndarray, b: np.ndarray) -> float:
    """r(sharpness, b) read as −r(η_c, b): Pearson r in the space the measurement lives in
    (not_descent at η_c = 0, a near-zero η_c a small number rather than a spike), signed
    so that a positive value still means sharpness rises with b."""
    used = eta.used
    r = _correlation(eta.t[used], eta.eta[used], t_b, b)
    return -r if np.isfinite(r) else r


def _eta_summary(eta: EtaSeries, opts: AnalysisOptions) -> dict[str, Any]:
    """The summaries of a line-search run, taken on η_c (see :mod:`.etaspace`)."""
    used = eta.used
    t, v = eta.t[used], eta.eta[used]
    stat = opts.final_statistic
    failed = eta.status != OK
    return {
        "peak": peak_sharpness(v, TAIL_FRACTION, stat), "final": final_sharpness(v, TAIL_FRACTION, stat),
        "phases": detect_three_phase(eta.t, eta.eta, reciprocal=SHARPNESS_PER_ETA),
        "phase_means": windows_sharpness(t, v, PHASE_WINDOWS),
        "early": {h: window_sharpness(v[t <= h + 1e-12]) for h in opts.early_horizons},
        "failed_share": float(np.mean(failed)) if eta.t.size else float("nan"),
    }


def summarize_run(run: Run, opts: AnalysisOptions, *, require_metric: bool = True) -> RunSummary:
    """Everything the analysis needs of one run. ``require_metric=False`` reads a run that
    never logs the metric too (a run report shows its losses); its sharpness is then empty."""
    t, s = run.series(opts.metric)  # each series is read (and validated) once
    # In training order: the final window is the last points in t, whatever order a writer
    # (say, a measurement over checkpoints) appended them in. A stable sort: no-op when sorted.
    order = np.argsort(t, kind="stable")
    t, s = t[order], s[order]
    if t.size == 0 and require_metric:
        raise UserError(f"run '{run.path}' logs no '{opts.metric}'; pick the sharpness metric with --metric")
    t_loss, loss = run.series(TRAIN_LOSS)
    t_grad, grad = run.series(TRAIN_GRAD_NORM)
    val_losses = {k.split("/")[1]: run.last(k) for k in sorted(run.keys())
                  if k.startswith(EVAL_PREFIX) and k.endswith("/loss") and k.count("/") == 2}
    eta = eta_series(run) if opts.eta_space and opts.metric == CRITICAL else None
    if eta is not None:
        summary = _eta_summary(eta, opts)
        edge_ratio, frac_above = _eta_edge(eta, *lr_series(run))
        r_loss, r_grad = _eta_correlation(eta, t_loss, loss), _eta_correlation(eta, t_grad, grad)
    else:
        summary = {"peak": peak_value(s), "final": final_value(s, statistic=opts.final_statistic),
                   "phases": detect_three_phase(t, s), "phase_means": phase_means(t, s),
                   "early": {h: early_mean(t, s, h) for h in opts.early_horizons},
                   "failed_share": float(np.mean(~np.isfinite(s))) if s.size else float("nan")}
        edge_ratio, frac_above = _edge_of_stability(t, s, *lr_series(run))
        r_loss, r_grad = _correlation(t, s, t_loss, loss), _correlation(t, s, t_grad, grad)
    measure_finals, measure_r = {}, {}
    for name, key in MEASURES.items():
        t_m, values = (t, s) if key == opts.metric else run.series(key)
        if values.size:
            if key == opts.metric:
                measure_finals[name] = summary["final"]
            else:
                measure_finals[name] = final_value(values, statistic=opts.final_statistic)
            same = key == opts.metric or eta is None
            measure_r[name] = _correlation(t, s, t_m, values) if same else _eta_correlation(eta, t_m, values)
    return RunSummary(
        run=run, t=t, sharpness=s, peak=summary["peak"], final=summary["final"],
        final_loss=final_value(loss) if loss.size else float("nan"), accuracy=_accuracy_tasks(run),
        phases=summary["phases"], phase_means=summary["phase_means"],
        r_loss=r_loss, r_grad=r_grad, measure_finals=measure_finals, measure_r=measure_r,
        early=summary["early"],
        final_val_loss=run.last(EVAL_LOSS), val_losses={k: v for k, v in val_losses.items() if math.isfinite(v)},
        edge_ratio=edge_ratio, frac_above_edge=frac_above, failed_share=summary["failed_share"],
        failed_reasons={k.rsplit("/", 1)[1]: int(np.nansum(run.series(k)[1])) for k in sorted(run.keys())
                        if k.startswith(FAILED_PREFIX)}, eta=eta)


def by_model(runs: list[RunSummary]) -> list[list[RunSummary]]:
    """The runs grouped by ``model`` label (seeds of one model together), smallest model first."""
    groups: dict[str, list[RunSummary]] = {}
    for r in runs:
        groups.setdefault(r.run.model, []).append(r)
    return sorted(groups.values(), key=lambda g: g[0].run.n_params)


def finite_mean(values: Iterable[float | None]) -> float:
    """Mean of the finite values (None and NaN are missing readings, not zeros); NaN if none."""
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def model_means(models: list[list[RunSummary]], attr: Callable[[RunSummary], float]) -> np.ndarray:
    """``attr`` averaged over each model's runs (:func:`finite_mean`), one value per model."""
    return np.array([finite_mean(attr(r) for r in g) for g in models])


def sharpness_mean(runs: Iterable[RunSummary], attr: Callable[[RunSummary], float]) -> float:
    """A critical-sharpness summary (final, peak) averaged over runs (seeds): for
    line-search runs on η, 2 / mean(2/λ) (the harmonic mean), as each run's own summary is;
    otherwise :func:`finite_mean`. An infinite λ (a window of uphill updates) counts as
    η = 0."""
    runs = list(runs)
    values = [attr(r) for r in runs]
    if not runs or any(r.eta is None for r in runs):
        return finite_mean(values)
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    return window_sharpness(to_sharpness(v)) if v.size else float("nan")


def model_sharpness(models: list[list[RunSummary]], attr: Callable[[RunSummary], float]) -> np.ndarray:
    """:func:`sharpness_mean` of ``attr`` per model, one value per model."""
    return np.array([sharpness_mean(g, attr) for g in models])


@dataclass
class StudyAnalysis:
    """Every table (a list of row dicts, keyed by table name) and the headline summary."""

    tables: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    runs: list[RunSummary] = field(default_factory=list)
    scaling: ScalingLaw | None = None
    options: AnalysisOptions = field(default_factory=AnalysisOptions)
    ladder: frozenset[Path] | None = None
    """Paths of the runs fitted across sizes; None: the runs of group 'scales' (a study)."""
    kind: str = "study"
    """"study": the simulated or measured study's analysis; "runs": a report of arbitrary
    runs (per-run readings, and the cross-scale analysis only when they hold 3 sizes)."""
    notes: list[str] = field(default_factory=list)
    """One-line statements of what was skipped and why (printed and shown in the report)."""

    def group(self, name: str) -> list[RunSummary]:
        return [r for r in self.runs if name in r.run.groups]

    def scale_runs(self) -> list[RunSummary]:
        """The runs that the cross-scale statistics are fitted across."""
        if self.ladder is None:
            return self.group("scales")
        return [r for r in self.runs if r.run.path in self.ladder]
