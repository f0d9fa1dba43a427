"""The study analysis: from a directory of runs to tables and headline statistics.

Source-agnostic: it reads runs in the shared format and never the simulator's parameters,
so measured runs go through exactly the same code. Runs are grouped by their config's
``group`` ("scales" when absent); runs of one ``model`` (other seeds) are averaged in the
per-model tables and the scaling fits (with a standard deviation column), and kept apart in
the early-prediction regression.

Each table is one function of the analysis (:data:`TABLES`, in the order they are built
and written); the headline summary and then the claims read the finished tables.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import UserError
from ..runs import Run
from ..sizes import size_label
from .bounds import pac_bayes_bound, source_variant
from .claims import evaluate_claims
from .fits import ScalingLaw, line_fit, pearson
from .phases import final_value
from .summaries import (MEASURES, AnalysisOptions, RunSummary, StudyAnalysis, by_model, finite_mean, model_means,
                        model_sharpness, sharpness_mean, summarize_run)
from ..metrics import EVALS, EVAL_LOSS, LAMBDA_MAX, LR_OVER_ETA_C

DEFAULT_EXTRAPOLATION = (13e9, 30e9, 70e9)

Rows = list[dict[str, Any]]


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
    models = by_model(out.scale_runs())
    if len(models) < 3:
        raise UserError(f"the study has {len(models)} model size(s) in its 'scales' group; "
                        "fitting across scales needs at least 3")
    finals = _finals(models)
    if not np.all(np.isfinite(finals)):
        bad = models[int(np.flatnonzero(~np.isfinite(finals))[0])][0].run.model
        raise UserError(f"model {bad} has no finite final sharpness; check its metrics for NaN")
    out.scaling = ScalingLaw(_sizes(models), finals, what="final sharpness")
    for name, build in TABLES.items():
        rows = build(out)
        if rows is not None:
            out.tables[name] = rows
    out.summary = study_summary(out)
    claims = evaluate_claims(out)
    out.tables["claims"] = [c.as_row() for c in claims]
    out.summary["claims"] = {c.key: c.as_dict() for c in claims}
    return out


# --- what the per-model tables share ----------------------------------------------------

def _models(a: StudyAnalysis) -> list[list[RunSummary]]:
    return by_model(a.scale_runs())


def _sizes(models: list[list[RunSummary]]) -> np.ndarray:
    return np.array([g[0].run.n_params for g in models])


def _finals(models: list[list[RunSummary]]) -> np.ndarray:
    return model_sharpness(models, lambda r: r.final)


def _head(g: list[RunSummary]) -> dict[str, Any]:
    """The first columns of a per-model row."""
    return {"model": g[0].run.model, "n_params": g[0].run.n_params}


def _three_phase(g: list[RunSummary]) -> str:
    return f"{sum(r.phases.preserved for r in g)}/{len(g)}"


def _std(values) -> float:
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(v.std(ddof=1)) if v.size > 1 else float("nan")


def _measure_finals(models: list[list[RunSummary]]) -> dict[str, np.ndarray]:
    """Mean final value per model of each measure that every scale run logs."""
    names = [m for m in MEASURES if all(m in r.measure_finals for g in models for r in g)]
    # critical sharpness of line-search runs is averaged over seeds on η, as its final is
    return {m: (model_sharpness if m == "critical" else model_means)(models, lambda r, m=m: r.measure_finals[m])
            for m in names}


# --- the tables -------------------------------------------------------------------------

def table_scales(a: StudyAnalysis) -> Rows:
    rows = []
    for g in _models(a):
        row = {**_head(g), "n_runs": len(g),
               "peak_sharpness": sharpness_mean(g, lambda r: r.peak),
               "final_sharpness": sharpness_mean(g, lambda r: r.final),
               "final_loss": finite_mean(r.final_loss for r in g),
               "mean_accuracy": finite_mean(r.mean_accuracy for r in g),
               "peak_to_plateau": finite_mean(r.peak / r.final for r in g)}
        # columns only some writers have: shown when any run of the model has them
        if any(math.isfinite(r.final_val_loss) for r in g):
            row["final_val_loss"] = finite_mean(r.final_val_loss for r in g)
        if any(math.isfinite(r.edge_ratio) for r in g):
            row["edge_ratio"] = finite_mean(r.edge_ratio for r in g)
        if any(r.failed_share > 0 for r in g):
            row["failed_share"] = finite_mean(r.failed_share for r in g)
        row["three_phase"] = _three_phase(g)
        if len(g) > 1:  # seeds of one model: their spread says how much a difference means
            row["final_sharpness_std"] = _std([r.final for r in g])
            row["peak_sharpness_std"] = _std([r.peak for r in g])
        rows.append(row)
    return rows


def table_downstream(a: StudyAnalysis) -> Rows:
    models = _models(a)
    tasks = sorted({k for g in models for r in g for k in r.accuracy})
    return [{**_head(g), **{task: finite_mean(r.accuracy.get(task, np.nan) for r in g) for task in tasks},
             "mean_accuracy": finite_mean(r.mean_accuracy for r in g),
             "final_sharpness": sharpness_mean(g, lambda r: r.final)}
            for g in models] if tasks else []


def table_correlations(a: StudyAnalysis) -> Rows:
    return [{**_head(g), "r_sharpness_loss": finite_mean(r.r_loss for r in g),
             "r_sharpness_grad_norm": finite_mean(r.r_grad for r in g)} for g in _models(a)]


def table_phases(a: StudyAnalysis) -> Rows:
    return [{**_head(g), **{f"phase{i + 1}": sharpness_mean(g, lambda r, i=i: r.phase_means[i]) for i in range(3)},
             "t_peak": finite_mean(r.phases.t_peak for r in g), "t_plateau": finite_mean(r.phases.t_plateau for r in g),
             "peak_to_plateau": finite_mean(r.peak / r.final for r in g), "three_phase": _three_phase(g),
             "reason": "; ".join(sorted({r.phases.reason for r in g if r.phases.reason}))}
            for g in _models(a)]


def table_pac_bayes(a: StudyAnalysis) -> Rows:
    models, opts = _models(a), a.options
    n_params, finals = _sizes(models), _finals(models)
    bound = pac_bayes_bound(finals, n_params, m=opts.pac_m, delta=opts.pac_delta)
    variant = source_variant(finals, n_params, m=opts.pac_m)
    return [{**_head(g), "final_sharpness": finals[i], "m": opts.pac_m, "delta": opts.pac_delta, "bound": bound[i],
             "source_sqrt_s_over_m": variant["sqrt_s_over_m"][i], "source_sqrt_ln_n": variant["sqrt_ln_n"][i],
             "source_bound": variant["source_bound"][i]}
            for i, g in enumerate(models)]


def table_measures(a: StudyAnalysis) -> Rows:
    """The scaling fit of each measure, and how it tracks critical sharpness."""
    scale_runs = a.scale_runs()
    models = by_model(scale_runs)
    finals = _measure_finals(models)
    rows = []
    for m, vals in finals.items():
        if not np.all(np.isfinite(vals)):  # a size without a final value: no fit
            continue
        f = ScalingLaw(_sizes(models), vals, what=m).summary()
        rows.append({
            "measure": m, "metric": MEASURES[m], "slope": f.slope, "intercept": f.intercept, "r2": f.r2,
            "r": f.r, "aic_loglinear": f.aic_loglinear, "aic_power": f.aic_power, "preferred": f.preferred,
            "r_final_vs_critical": pearson(vals, finals.get("critical", _finals(models))),
            "r_trajectory_vs_critical": finite_mean(r.measure_r.get(m, np.nan) for r in scale_runs)})
    return rows


def table_measures_by_scale(a: StudyAnalysis) -> Rows:
    models = _models(a)
    finals = _measure_finals(models)
    return [{**_head(g), **{f"final_{m}": v[i] for m, v in finals.items()}} for i, g in enumerate(models)]


def table_schedules(a: StudyAnalysis) -> Rows:
    runs = sorted(a.group("schedules"), key=lambda r: (r.run.n_params, str(r.run.config.get("schedule"))))
    return [{"model": r.run.model, "n_params": r.run.n_params, "schedule": r.run.config.get("schedule", ""),
             "seed": r.run.config.get("seed"), "peak_sharpness": r.peak, "final_sharpness": r.final,
             "peak_to_plateau": r.peak / r.final, "three_phase": r.phases.preserved,
             "n_spikes": r.phases.n_spikes, "final_loss": r.final_loss, "mean_accuracy": r.mean_accuracy,
             "reason": r.phases.reason} for r in runs]


def table_ablations(a: StudyAnalysis) -> Rows:
    def ablation(r: RunSummary) -> dict[str, Any]:
        return r.run.config.get("ablation", {})

    runs = sorted(a.group("ablations"), key=lambda r: (r.run.n_params, str(ablation(r).get("factor")),
                                                       float(ablation(r).get("level", 0))))
    return [{"model": r.run.model, "n_params": r.run.n_params, "factor": ablation(r).get("factor", ""),
             "level": ablation(r).get("level", float("nan")), "three_phase": r.phases.preserved,
             "peak_sharpness": r.peak, "final_sharpness": r.final, "peak_to_plateau": r.peak / r.final,
             "t_peak": r.phases.t_peak, "reason": r.phases.reason} for r in runs]


def table_extrapolation(a: StudyAnalysis) -> Rows:
    """The law's predictions at the extrapolation runs' sizes (against what they observed),
    else at the sizes asked for."""
    extra_models = by_model(a.group("extrapolation"))
    targets = [g[0].run.n_params for g in extra_models] or list(a.options.extrapolate or DEFAULT_EXTRAPOLATION)
    observed = {g[0].run.n_params: (g[0].run.model, sharpness_mean(g, lambda r: r.final)) for g in extra_models}
    rows = []
    for pred in a.scaling.predict(targets):
        model, obs = observed.get(pred["n_params"], (size_label(pred["n_params"]), float("nan")))
        rows.append({
            "model": model, **pred, "observed": obs,
            "rel_error_pct": 100 * abs(pred["predicted"] - obs) / abs(obs) if math.isfinite(obs) else float("nan"),
            "within_interval": (pred["lower"] <= obs <= pred["upper"]) if math.isfinite(obs) else None})
    return rows


def table_training(a: StudyAnalysis) -> Rows | None:
    """Runs trained with the live monitor; only studies with trained runs have this table."""
    runs = a.group("training")
    return [_training_row(r) for r in sorted(runs, key=lambda r: r.run.n_params)] if runs else None


def _training_row(r: RunSummary) -> dict[str, Any]:
    """One trained run: its loss, its sharpness and how often the step outran η_c."""
    run = r.run
    _, ratio = run.series(LR_OVER_ETA_C)
    ratio = ratio[np.isfinite(ratio)]
    _, lam_max = run.series(LAMBDA_MAX)
    _, eval_loss = run.series(EVAL_LOSS)
    _, evals = run.series(EVALS)
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


def table_early_prediction(a: StudyAnalysis) -> Rows:
    """Per horizon, the regression over single runs (seeds kept apart: more points) of the
    ladder and of the extrapolation sizes."""
    ladder_ids = {id(r) for r in a.scale_runs()}
    plain = [r for r in a.runs if id(r) in ladder_ids or "extrapolation" in r.run.groups]
    return [_early_prediction(plain, h) for h in a.options.early_horizons]


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


TABLES: dict[str, Callable[[StudyAnalysis], Rows | None]] = {
    "scales": table_scales, "downstream": table_downstream, "correlations": table_correlations,
    "phases": table_phases, "pac_bayes": table_pac_bayes, "measures": table_measures,
    "measures_by_scale": table_measures_by_scale, "schedules": table_schedules, "ablations": table_ablations,
    "extrapolation": table_extrapolation, "training": table_training, "early_prediction": table_early_prediction,
}
"""Every study table (None from a builder: the study has no such table), in the order they
are built, written and shown; the claims table comes last, after the summary."""


# --- the summary ------------------------------------------------------------------------

def study_summary(a: StudyAnalysis) -> dict[str, Any]:
    """The headline statistics, read from the finished tables."""
    models, t = _models(a), a.tables
    n_params, finals = _sizes(models), _finals(models)
    scale_runs = a.scale_runs()
    measure_finals = _measure_finals(models)
    names = list(measure_finals)
    by_factor: dict[str, list[int]] = {}
    for row in t["ablations"]:
        c = by_factor.setdefault(row["factor"], [0, 0])
        c[0] += bool(row["three_phase"])
        c[1] += 1

    def column(table: str, key: str) -> np.ndarray:
        return np.array([row[key] for row in t[table]])

    def by_model_name(table: str, key: str) -> dict[str, Any]:
        return {row["model"]: row[key] for row in t[table]}

    return {
        "n_runs": len(a.runs), "metric": a.options.metric, "final_statistic": a.options.final_statistic,
        "sources": sorted({str(r.run.config.get("source")) for r in a.runs}),
        "scaling_law": a.scaling.summary().as_dict(),
        "r_final_sharpness_accuracy": pearson(finals, column("scales", "mean_accuracy")),
        "r_final_sharpness_loss": pearson(finals, column("scales", "final_loss")),
        "r_peak_log_n": pearson(column("scales", "peak_sharpness"), np.log10(n_params)),
        "peak_to_plateau": by_model_name("scales", "peak_to_plateau"),
        "coupling_sharpness_grad_norm": by_model_name("correlations", "r_sharpness_grad_norm"),
        "coupling_sharpness_loss": by_model_name("correlations", "r_sharpness_loss"),
        "three_phase_scales": f"{sum(r.phases.preserved for r in scale_runs)}/{len(scale_runs)}",
        "ablations_preserved": f"{sum(bool(r['three_phase']) for r in t['ablations'])}/{len(t['ablations'])}",
        "ablations_by_factor": {k: f"{v[0]}/{v[1]}" for k, v in by_factor.items()},
        "schedules_preserved": {f"{row['model']}/{row['schedule']}": row["three_phase"] for row in t["schedules"]},
        "measure_correlations": {f"{m1}~{m2}": pearson(measure_finals[m1], measure_finals[m2])
                                 for i, m1 in enumerate(names) for m2 in names[i + 1:]},
        "extrapolation": {row["model"]: {"predicted": row["predicted"], "lower": row["lower"], "upper": row["upper"],
                                         "observed": row["observed"]} for row in t["extrapolation"]},
        "early_prediction": {f"{row['horizon']:g}": {"r2": row["r2"], "loo_r2": row["loo_r2"], "n": row["n_runs"]}
                             for row in t["early_prediction"]},
    }
