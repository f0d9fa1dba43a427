"""The study analysis: from a directory of runs to tables and headline statistics.

Source-agnostic: it reads runs in the shared format and never the simulator's parameters,
so measured runs go through exactly the same code. Runs are grouped by their config's
``group`` ("scales" when absent); runs of one ``model`` (other seeds) are averaged in the
per-model tables and the scaling fits (with a standard deviation column), and kept apart in
the early-prediction regression.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..runs import Run
from ..sizes import size_label
from .bounds import pac_bayes_bound, source_variant
from .fits import ScalingLaw, line_fit, pearson
from .phases import PhaseResult, detect_three_phase, early_mean, final_value, peak_value, phase_means

SHARPNESS = "sharpness/critical"
LOSS = "train/loss"
GRAD_NORM = "train/grad_norm"
MEASURES = {"critical": "sharpness/critical", "lambda_max": "sharpness/lambda_max",
            "trace_per_param": "sharpness/trace_per_param"}
ACC_PREFIX = "eval/acc/"
VAL_LOSS = "eval/loss"
STABILITY_FROM = 0.1
"""Where a run is read against the 2/lr line: after warmup and the first rise (t ≥ 0.1)."""
DEFAULT_EXTRAPOLATION = (13e9, 30e9, 70e9)


@dataclass
class AnalysisOptions:
    metric: str = SHARPNESS
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
    study's definition) or "median" (robust to the heavy tails of measured λ_c)."""


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
        elif key.startswith("eval/") and key.endswith("/accuracy") and key.count("/") == 2:
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
    t_two, two_over_lr = run.series("sharpness/two_over_lr")
    with np.errstate(divide="ignore", invalid="ignore"):
        return t_two, np.where(two_over_lr > 0, 2.0 / two_over_lr, np.nan)


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
    t_loss, loss = run.series(LOSS)
    t_grad, grad = run.series(GRAD_NORM)
    accuracy = _accuracy_tasks(run)
    val_losses = {k.split("/")[1]: run.last(k) for k in sorted(run.keys())
                  if k.startswith("eval/") and k.endswith("/loss") and k.count("/") == 2}
    edge_ratio, frac_above = _edge_of_stability(t, s, *lr_series(run))
    measure_finals, measure_r = {}, {}
    for name, key in MEASURES.items():
        t_m, values = (t, s) if key == opts.metric else run.series(key)
        if values.size:
            measure_finals[name] = final_value(values, statistic=opts.final_statistic)
            measure_r[name] = _correlation(t, s, t_m, values)
    return RunSummary(
        run=run, t=t, sharpness=s, peak=peak_value(s), final=final_value(s, statistic=opts.final_statistic),
        final_loss=final_value(loss) if loss.size else float("nan"), accuracy=accuracy,
        phases=detect_three_phase(t, s), phase_means=phase_means(t, s),
        r_loss=_correlation(t, s, t_loss, loss), r_grad=_correlation(t, s, t_grad, grad),
        measure_finals=measure_finals, measure_r=measure_r,
        early={h: early_mean(t, s, h) for h in opts.early_horizons},
        final_val_loss=run.last(VAL_LOSS), val_losses={k: v for k, v in val_losses.items() if math.isfinite(v)},
        edge_ratio=edge_ratio, frac_above_edge=frac_above,
        failed_share=float(np.mean(~np.isfinite(s))) if s.size else float("nan"),
        failed_reasons={k.rsplit("/", 1)[1]: int(np.nansum(run.series(k)[1])) for k in sorted(run.keys())
                        if k.startswith("sharpness/failed/")})


def _mean(values) -> float:
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _std(values) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.std(ddof=1)) if v.size > 1 else float("nan")


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


def _by_model(runs: list[RunSummary]) -> list[list[RunSummary]]:
    groups: dict[str, list[RunSummary]] = {}
    for r in runs:
        groups.setdefault(r.run.model, []).append(r)
    return sorted(groups.values(), key=lambda g: g[0].run.n_params)


def analyze_runs(runs: list[Run], opts: AnalysisOptions | None = None) -> StudyAnalysis:
    """The study analysis: every run logs the metric and the 'scales' group holds at least
    3 model sizes (anything else is a UserError; :func:`analysis.runset.analyze_any`
    reads any runs)."""
    opts = opts or AnalysisOptions()
    return analyze_summaries([summarize_run(r, opts) for r in runs], opts)


def analyze_summaries(summaries: list[RunSummary], opts: AnalysisOptions,
                      ladder: frozenset[Path] | None = None) -> StudyAnalysis:
    """The study analysis of runs already summarised; ``ladder``: the paths of the runs to
    fit across sizes (default: group 'scales')."""
    out = StudyAnalysis(runs=summaries, options=opts, ladder=ladder)
    scale_runs = out.scale_runs()
    models = _by_model(scale_runs)
    if len(models) < 3:
        raise UserError(f"the study has {len(models)} model size(s) in its 'scales' group; "
                        "fitting across scales needs at least 3")
    n_params = np.array([g[0].run.n_params for g in models])
    finals = np.array([_mean(r.final for r in g) for g in models])
    if not np.all(np.isfinite(finals)):
        bad = models[int(np.flatnonzero(~np.isfinite(finals))[0])][0].run.model
        raise UserError(f"model {bad} has no finite final sharpness; check its metrics for NaN")
    law = ScalingLaw(n_params, finals, what="final sharpness")
    out.scaling = law
    fit = law.summary()

    # --- scales -------------------------------------------------------------------------
    scales = []
    for g in models:
        row = {"model": g[0].run.model, "n_params": g[0].run.n_params, "n_runs": len(g),
               "peak_sharpness": _mean(r.peak for r in g), "final_sharpness": _mean(r.final for r in g),
               "final_loss": _mean(r.final_loss for r in g), "mean_accuracy": _mean(r.mean_accuracy for r in g),
               "peak_to_plateau": _mean(r.peak / r.final for r in g),
               **({"final_val_loss": _mean(r.final_val_loss for r in g)} if any(math.isfinite(r.final_val_loss) for r in g) else {}),
               **({"edge_ratio": _mean(r.edge_ratio for r in g)} if any(math.isfinite(r.edge_ratio) for r in g) else {}),
               **({"failed_share": _mean(r.failed_share for r in g)} if any(r.failed_share > 0 for r in g) else {}),
               "three_phase": f"{sum(r.phases.preserved for r in g)}/{len(g)}"}
        if len(g) > 1:
            row["final_sharpness_std"] = _std([r.final for r in g])
            row["peak_sharpness_std"] = _std([r.peak for r in g])
        scales.append(row)
    out.tables["scales"] = scales

    # --- downstream ---------------------------------------------------------------------
    tasks = sorted({k for r in scale_runs for k in r.accuracy})
    out.tables["downstream"] = [
        {"model": g[0].run.model, "n_params": g[0].run.n_params,
         **{task: _mean(r.accuracy.get(task, np.nan) for r in g) for task in tasks},
         "mean_accuracy": _mean(r.mean_accuracy for r in g), "final_sharpness": _mean(r.final for r in g)}
        for g in models] if tasks else []

    # --- correlations -------------------------------------------------------------------
    out.tables["correlations"] = [
        {"model": g[0].run.model, "n_params": g[0].run.n_params,
         "r_sharpness_loss": _mean(r.r_loss for r in g), "r_sharpness_grad_norm": _mean(r.r_grad for r in g)}
        for g in models]
    mean_acc = np.array([row["mean_accuracy"] for row in scales])
    final_loss = np.array([row["final_loss"] for row in scales])
    peaks = np.array([row["peak_sharpness"] for row in scales])

    # --- phases -------------------------------------------------------------------------
    out.tables["phases"] = []
    for g in models:
        pm = np.array([r.phase_means for r in g])
        out.tables["phases"].append({
            "model": g[0].run.model, "n_params": g[0].run.n_params,
            "phase1": _mean(pm[:, 0]), "phase2": _mean(pm[:, 1]), "phase3": _mean(pm[:, 2]),
            "t_peak": _mean(r.phases.t_peak for r in g), "t_plateau": _mean(r.phases.t_plateau for r in g),
            "peak_to_plateau": _mean(r.peak / r.final for r in g),
            "three_phase": f"{sum(r.phases.preserved for r in g)}/{len(g)}",
            "reason": "; ".join(sorted({r.phases.reason for r in g if r.phases.reason}))})

    # --- PAC-Bayes ----------------------------------------------------------------------
    bound = pac_bayes_bound(finals, n_params, m=opts.pac_m, delta=opts.pac_delta)
    variant = source_variant(finals, n_params, m=opts.pac_m)
    out.tables["pac_bayes"] = [
        {"model": g[0].run.model, "n_params": g[0].run.n_params, "final_sharpness": finals[i],
         "m": opts.pac_m, "delta": opts.pac_delta, "bound": bound[i],
         "source_sqrt_s_over_m": variant["sqrt_s_over_m"][i], "source_sqrt_ln_n": variant["sqrt_ln_n"][i],
         "source_bound": variant["source_bound"][i]}
        for i, g in enumerate(models)]

    # --- measures -----------------------------------------------------------------------
    measures_rows, by_scale = [], []
    measure_names = [m for m in MEASURES if all(m in r.measure_finals for r in scale_runs)]
    measure_finals = {m: np.array([_mean(r.measure_finals[m] for r in g) for g in models]) for m in measure_names}
    for m in measure_names:
        vals = measure_finals[m]
        if np.all(np.isfinite(vals)):
            f = ScalingLaw(n_params, vals, what=m).summary()
            measures_rows.append({
                "measure": m, "metric": MEASURES[m], "slope": f.slope, "intercept": f.intercept, "r2": f.r2,
                "r": f.r, "aic_loglinear": f.aic_loglinear, "aic_power": f.aic_power, "preferred": f.preferred,
                "r_final_vs_critical": pearson(vals, measure_finals.get("critical", finals)),
                "r_trajectory_vs_critical": _mean(r.measure_r.get(m, np.nan) for r in scale_runs)})
    for i, g in enumerate(models):
        by_scale.append({"model": g[0].run.model, "n_params": g[0].run.n_params,
                         **{f"final_{m}": measure_finals[m][i] for m in measure_names}})
    out.tables["measures"] = measures_rows
    out.tables["measures_by_scale"] = by_scale
    cross = {}
    for i, a in enumerate(measure_names):
        for b in measure_names[i + 1:]:
            cross[f"{a}~{b}"] = pearson(measure_finals[a], measure_finals[b])

    # --- schedules ----------------------------------------------------------------------
    out.tables["schedules"] = []
    for r in sorted(out.group("schedules"), key=lambda r: (r.run.n_params, str(r.run.config.get("schedule")))):
        out.tables["schedules"].append({
            "model": r.run.model, "n_params": r.run.n_params, "schedule": r.run.config.get("schedule", ""),
            "seed": r.run.config.get("seed"), "peak_sharpness": r.peak, "final_sharpness": r.final,
            "peak_to_plateau": r.peak / r.final, "three_phase": r.phases.preserved,
            "n_spikes": r.phases.n_spikes, "final_loss": r.final_loss, "mean_accuracy": r.mean_accuracy,
            "reason": r.phases.reason})

    # --- ablations ----------------------------------------------------------------------
    out.tables["ablations"] = []
    for r in sorted(out.group("ablations"), key=lambda r: (r.run.n_params, str(r.run.config.get("ablation", {}).get("factor")),
                                                           float(r.run.config.get("ablation", {}).get("level", 0)))):
        ab = r.run.config.get("ablation", {})
        out.tables["ablations"].append({
            "model": r.run.model, "n_params": r.run.n_params, "factor": ab.get("factor", ""),
            "level": ab.get("level", float("nan")), "three_phase": r.phases.preserved,
            "peak_sharpness": r.peak, "final_sharpness": r.final, "peak_to_plateau": r.peak / r.final,
            "t_peak": r.phases.t_peak, "reason": r.phases.reason})

    # --- extrapolation ------------------------------------------------------------------
    extra_models = _by_model(out.group("extrapolation"))
    targets = [g[0].run.n_params for g in extra_models] or list(opts.extrapolate or DEFAULT_EXTRAPOLATION)
    observed = {g[0].run.n_params: (g[0].run.model, _mean(r.final for r in g)) for g in extra_models}
    out.tables["extrapolation"] = []
    for pred in law.predict(targets):
        model, obs = observed.get(pred["n_params"], (size_label(pred["n_params"]), float("nan")))
        out.tables["extrapolation"].append({
            "model": model, **pred, "observed": obs,
            "rel_error_pct": 100 * abs(pred["predicted"] - obs) / abs(obs) if math.isfinite(obs) else float("nan"),
            "within_interval": (pred["lower"] <= obs <= pred["upper"]) if math.isfinite(obs) else None})

    # --- training runs (measured with the live monitor) ----------------------------------
    if out.group("training"):  # only studies with trained runs get the table
        out.tables["training"] = [_training_row(r) for r in sorted(out.group("training"), key=lambda r: r.run.n_params)]

    # --- early prediction ---------------------------------------------------------------
    ladder_ids = {id(r) for r in scale_runs}
    plain = [r for r in summaries if id(r) in ladder_ids or "extrapolation" in r.run.groups]
    out.tables["early_prediction"] = [_early_prediction(plain, h) for h in opts.early_horizons]

    # --- summary ------------------------------------------------------------------------
    ablation_rows = out.tables["ablations"]
    by_factor: dict[str, list[int]] = {}
    for row in ablation_rows:
        c = by_factor.setdefault(row["factor"], [0, 0])
        c[0] += bool(row["three_phase"])
        c[1] += 1
    out.summary = {
        "n_runs": len(summaries), "metric": opts.metric, "final_statistic": opts.final_statistic,
        "sources": sorted({str(r.run.config.get("source")) for r in summaries}),
        "scaling_law": fit.as_dict(),
        "r_final_sharpness_accuracy": pearson(finals, mean_acc),
        "r_final_sharpness_loss": pearson(finals, final_loss),
        "r_peak_log_n": pearson(peaks, np.log10(n_params)),
        "peak_to_plateau": {row["model"]: row["peak_to_plateau"] for row in scales},
        "coupling_sharpness_grad_norm": {row["model"]: row["r_sharpness_grad_norm"] for row in out.tables["correlations"]},
        "coupling_sharpness_loss": {row["model"]: row["r_sharpness_loss"] for row in out.tables["correlations"]},
        "three_phase_scales": f"{sum(r.phases.preserved for r in scale_runs)}/{len(scale_runs)}",
        "ablations_preserved": f"{sum(bool(r['three_phase']) for r in ablation_rows)}/{len(ablation_rows)}",
        "ablations_by_factor": {k: f"{v[0]}/{v[1]}" for k, v in by_factor.items()},
        "schedules_preserved": {f"{row['model']}/{row['schedule']}": row["three_phase"] for row in out.tables["schedules"]},
        "measure_correlations": cross,
        "extrapolation": {row["model"]: {"predicted": row["predicted"], "lower": row["lower"], "upper": row["upper"],
                                         "observed": row["observed"]} for row in out.tables["extrapolation"]},
        "early_prediction": {f"{row['horizon']:g}": {"r2": row["r2"], "loo_r2": row["loo_r2"], "n": row["n_runs"]}
                             for row in out.tables["early_prediction"]},
    }
    from .claims import evaluate_claims  # the claims read the tables above

    claims = evaluate_claims(out)
    out.tables["claims"] = [c.as_row() for c in claims]
    out.summary["claims"] = {c.key: c.as_dict() for c in claims}
    return out


def _training_row(r: RunSummary) -> dict[str, Any]:
    """One trained run: its loss, its sharpness and how often the step outran η_c."""
    run = r.run
    _, ratio = run.series("sharpness/lr_over_eta_c")
    ratio = ratio[np.isfinite(ratio)]
    _, lam_max = run.series("sharpness/lambda_max")
    _, eval_loss = run.series("eval/loss")
    _, evals = run.series("sharpness/evals")
    return {
        "name": run.name, "model": run.model, "n_params": int(run.n_params),
        "steps": max((row["step"] for row in run.metrics), default=0),
        "final_train_loss": r.final_loss, "final_eval_loss": float(eval_loss[-1]) if eval_loss.size else float("nan"),
        "peak_sharpness": r.peak, "final_sharpness": r.final,
        "final_lambda_max": final_value(lam_max) if lam_max.size else float("nan"),
        "frac_lr_above_eta_c": float(np.mean(ratio > 1.0)) if ratio.size else float("nan"),
        "median_evals": float(np.median(evals)) if evals.size else float("nan"),
        "three_phase": r.phases.preserved, "reason": r.phases.reason,
        "r_sharpness_loss": r.r_loss,
    }


def _early_prediction(runs: list[RunSummary], horizon: float) -> dict[str, Any]:
    """Regress final sharpness on [early mean, log10 N, 1]; in-sample and leave-one-out R^2."""
    rows = [(r.early[horizon], math.log10(r.run.n_params), r.final) for r in runs]
    rows = [x for x in rows if all(math.isfinite(v) for v in x)]
    result = {"horizon": horizon, "n_runs": len(rows), "r2": float("nan"), "loo_r2": float("nan"),
              "coef_early": float("nan"), "coef_log_n": float("nan"), "intercept": float("nan"),
              "r2_log_n_only": float("nan")}
    if len(rows) < 4:
        return result
    data = np.array(rows)
    X = np.column_stack([data[:, 0], data[:, 1], np.ones(len(rows))])
    y = data[:, 2]
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    tss = float(np.sum((y - y.mean()) ** 2))
    rss = float(np.sum((y - X @ coef) ** 2))
    press = 0.0
    for i in range(len(rows)):
        keep = np.arange(len(rows)) != i
        c, *_ = np.linalg.lstsq(X[keep], y[keep], rcond=None)
        press += float((y[i] - X[i] @ c) ** 2)
    result.update(r2=1 - rss / tss if tss > 0 else float("nan"), loo_r2=1 - press / tss if tss > 0 else float("nan"),
                  coef_early=float(coef[0]), coef_log_n=float(coef[1]), intercept=float(coef[2]),
                  r2_log_n_only=line_fit(data[:, 1], y).r2 if np.ptp(data[:, 1]) > 0 else float("nan"))
    return result
