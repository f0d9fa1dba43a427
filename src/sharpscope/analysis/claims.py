"""The simulated study's claims, each reduced to one statistic and a verdict.

Every claim is evaluated on a :class:`StudyAnalysis` by the same code whether the runs
were simulated or measured, so a simulated and a measured report can be set side by side
(:mod:`sharpscope.analysis.compare`). Verdicts and their tests: :mod:`.verdicts`.

A claim is one function below, registered with :func:`claim`: it computes its statistic,
runs its test and applies its verdict rule, and returns a :class:`Claim` (or None when it
does not apply to these runs). Claims are evaluated, and reported, in the order they are
defined here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .summaries import RunSummary, StudyAnalysis, by_model, model_means, model_sharpness, sharpness_mean
from .verdicts import (FAILS, HOLDS, UNCLEAR, Claim, fmt, fmt_p, fraction_verdict, partial_r, pearson_test,
                       signed_verdict, slope_test)


@dataclass
class Scales:
    """What the claims read, computed once: the scale runs grouped by model (smallest
    first) and, per model, log10 N and the mean final and peak sharpness."""

    analysis: StudyAnalysis
    models: list[list[RunSummary]]
    runs: list[RunSummary]
    """The scale runs, model by model (the order the per-run statistics are taken in)."""
    log_n: np.ndarray
    finals: np.ndarray
    peaks: np.ndarray
    cells: dict[str, dict[str, Any]]
    """The schedule cells (:func:`schedule_cells`)."""

    @classmethod
    def of(cls, a: StudyAnalysis) -> "Scales":
        models = by_model(a.scale_runs())
        return cls(a, models, [r for g in models for r in g], np.log10([g[0].run.n_params for g in models]),
                   model_sharpness(models, lambda r: r.final), model_sharpness(models, lambda r: r.peak),
                   schedule_cells(a))

    def means(self, attr: Callable[[RunSummary], float]) -> np.ndarray:
        return model_means(self.models, attr)

    def per_model(self, values: np.ndarray) -> dict[str, float]:
        return dict(zip([g[0].run.model for g in self.models], values.tolist()))


ClaimFn = Callable[[Scales], "Claim | None"]
CLAIMS: list[ClaimFn] = []
"""The registered claims, in the order they are evaluated and reported."""


def claim(fn: ClaimFn) -> ClaimFn:
    """Register ``fn`` as the next claim."""
    CLAIMS.append(fn)
    return fn


def evaluate_claims(a: StudyAnalysis) -> list[Claim]:
    """Every registered claim that applies to ``a``, in registry order. The claims read the
    analysis' tables, so ``a`` is complete but for its claims."""
    s = Scales.of(a)
    return [c for fn in CLAIMS if (c := fn(s)) is not None]


# --- the shape of a trajectory and the scaling law --------------------------------------

@claim
def three_phase(s: Scales) -> Claim:
    # runs the detector cannot decide (too many non-finite points) are left out
    decidable = [r for r in s.runs if r.phases.decidable]
    k = sum(r.phases.preserved for r in decidable)
    undecided = len(s.runs) - len(decidable)
    reasons = sorted({r.phases.reason for r in s.runs if r.phases.reason})
    verdict = fraction_verdict(k, len(decidable)) if len(decidable) * 2 >= len(s.runs) else UNCLEAR
    return Claim(
        "three_phase", "Sharpness rises, then decays, then plateaus (three phases) at every scale.",
        "fraction of the decidable scale runs the detector accepts (holds ≥ 2/3, fails ≤ 1/3; "
        "inconclusive when fewer than half the runs are decidable)",
        k / len(decidable) if decidable else math.nan, verdict,
        f"{k}/{len(decidable)} decidable runs" + (f" ({undecided} undecidable)" if undecided else "")
        + (f"; rejected: {'; '.join(reasons)}" if reasons else ""),
        n=len(decidable), details={"per_model": {g[0].run.model: f"{sum(r.phases.preserved for r in g)}/{len(g)}"
                                                 for g in s.models}, "undecidable": undecided})


@claim
def loglinear_law(s: Scales) -> Claim:
    slope, p, r2, n = slope_test(s.log_n, s.finals)
    return Claim(
        "loglinear_law", "Final sharpness falls log-linearly with model size (negative slope in log10 N).",
        "OLS slope of final sharpness on log10 N, two-sided t-test", slope, signed_verdict(slope, p, -1),
        f"slope {fmt(slope, 4)} per decade, R² {fmt(r2, 4)}, {fmt_p(p)}", p_value=p, n=n, details={"r2": r2})


@claim
def loglinear_vs_power(s: Scales) -> Claim | None:
    if s.analysis.scaling is None:
        return None
    fit = s.analysis.scaling.summary()
    delta = fit.aic_power - fit.aic_loglinear
    verdict = UNCLEAR if not math.isfinite(delta) else (HOLDS if delta > 2 else FAILS if delta < -2 else UNCLEAR)
    return Claim(
        "loglinear_vs_power", "A log-linear law describes final sharpness better than a power law.",
        "ΔAIC = AIC(power) − AIC(log-linear) (holds > 2, fails < −2)", delta, verdict,
        f"AIC log-linear {fmt(fit.aic_loglinear, 2)} vs power {fmt(fit.aic_power, 2)} (ΔAIC {fmt(delta, 2)})",
        n=fit.n, details={"aic_loglinear": fit.aic_loglinear, "aic_power": fit.aic_power, "power_r2": fit.power_r2})


@claim
def peak_grows(s: Scales) -> Claim:
    r, p, n = pearson_test(s.log_n, s.peaks)
    return Claim(
        "peak_grows", "Larger models reach a higher sharpness peak.",
        "Pearson r(peak sharpness, log10 N)", r, signed_verdict(r, p, +1), f"r {fmt(r)}, {fmt_p(p)}", p_value=p, n=n,
        details={"peaks": s.per_model(s.peaks)})


@claim
def flatter_end(s: Scales) -> Claim:
    ratio = s.peaks / s.finals
    r, p, n = pearson_test(s.log_n, ratio)
    return Claim(
        "flatter_end", "Larger models end flatter relative to their peak (peak-to-plateau ratio grows with N).",
        "Pearson r(peak / final, log10 N)", r, signed_verdict(r, p, +1),
        f"r {fmt(r)}, {fmt_p(p)}; ratio {fmt(float(ratio[0]), 2)} → {fmt(float(ratio[-1]), 2)}", p_value=p, n=n,
        details={"peak_to_plateau": s.per_model(ratio)})


# --- sharpness against loss and accuracy ---------------------------------------------------

@claim
def sharpness_loss(s: Scales) -> Claim:
    # validation loss when at least 3 sizes log it: training loss also measures memorisation
    val = s.means(lambda r: r.final_val_loss)
    loss_kind = "validation" if np.isfinite(val).sum() >= 3 else "training"
    losses = val if loss_kind == "validation" else s.means(lambda r: r.final_loss)
    r, p, n = pearson_test(s.finals, losses)
    partial = partial_r(s.finals, losses, s.log_n)
    return Claim(
        "sharpness_loss", "Flatter final models have lower loss (positive correlation across scales).",
        f"Pearson r(final sharpness, final {loss_kind} loss) across sizes", r, signed_verdict(r, p, +1),
        f"r {fmt(r)}, {fmt_p(p)}; partial r given log10 N {fmt(partial)}", p_value=p, n=n,
        details={"loss": loss_kind, "partial_r_given_log_n": partial})


@claim
def sharpness_accuracy(s: Scales) -> Claim:
    acc = s.means(lambda r: r.mean_accuracy)
    r, p, n = pearson_test(s.finals, acc)
    logged = np.isfinite(acc)
    note = "" if math.isfinite(r) else "; accuracy does not vary across sizes" if logged.sum() >= 3 else "; no accuracy logged"
    lo, hi = (float(np.nanmin(acc)), float(np.nanmax(acc))) if logged.any() else (math.nan, math.nan)
    return Claim(
        "sharpness_accuracy", "Flatter final models score higher downstream (negative correlation).",
        "Pearson r(final sharpness, mean downstream accuracy) across sizes", r, signed_verdict(r, p, -1),
        f"r {fmt(r)}, {fmt_p(p)}; accuracy {fmt(lo)}–{fmt(hi)}{note}",
        p_value=p, n=n, details={"accuracy": s.per_model(acc), "partial_r_given_log_n": partial_r(s.finals, acc, s.log_n)})


@claim
def sharpness_source_loss(s: Scales) -> Claim | None:
    sources = sorted({src for r in s.runs for src in r.val_losses})
    if not sources:
        return None
    per_source = {}
    for src in sources:
        r, p, _ = pearson_test(s.finals, s.means(lambda r_, src=src: r_.val_losses.get(src, math.nan)))
        per_source[src] = {"r": r, "p": p, "verdict": signed_verdict(r, p, +1)}
    k = sum(v["verdict"] == HOLDS for v in per_source.values())
    kf = sum(v["verdict"] == FAILS for v in per_source.values())
    return Claim(
        "sharpness_source_loss", "Flatter final models have lower validation loss on each data source.",
        "Pearson r(final sharpness, final validation loss of the source), per source; holds when every source holds",
        k / len(sources), HOLDS if k == len(sources) else FAILS if kf == len(sources) else UNCLEAR,
        "; ".join(f"{src}: r {fmt(v['r'])}, {fmt_p(v['p'])}" for src, v in per_source.items()),
        n=len(s.models), details=per_source)


@claim
def coupling_grows(s: Scales) -> Claim:
    coupling = s.means(lambda r: r.r_grad)
    r, p, n = pearson_test(s.log_n, coupling)
    mean_coupling = float(np.nanmean(coupling)) if np.isfinite(coupling).any() else math.nan
    # a negative coupling rising toward 0 is a weakening link, not a tightening one
    verdict = FAILS if (math.isfinite(mean_coupling) and mean_coupling <= 0) else signed_verdict(r, p, +1)
    return Claim(
        "coupling_grows", "Within a run, sharpness follows the gradient norm, more tightly at larger scale.",
        "Pearson r(within-run r(sharpness, grad norm), log10 N), positive with p < 0.05, and a positive mean "
        "coupling (fails when the mean coupling is ≤ 0)", r, verdict,
        f"coupling {fmt(float(coupling[0]))} → {fmt(float(coupling[-1]))} (mean {fmt(mean_coupling)}); "
        f"r {fmt(r)}, {fmt_p(p)}", p_value=p, n=n, details={"coupling": s.per_model(coupling)})


# --- schedules ------------------------------------------------------------------------
# The schedule pattern and the direction of the final ratios are judged against the
# simulated study's by :mod:`.compare`; on one study they are reported without a verdict.

SCALE_RANKS = ("smallest", "middle", "largest")


def _scale_rank(n_params: float, sizes: list[float]) -> str:
    i = sizes.index(n_params)
    if len(sizes) == 3:
        return SCALE_RANKS[i]
    return "smallest" if i == 0 else "largest" if i == len(sizes) - 1 else f"rank{i}"


def schedule_cells(a: StudyAnalysis) -> dict[str, dict[str, Any]]:
    """Per (schedule, relative scale): three-phase fraction, spikes and final / cosine's final."""
    runs = a.group("schedules")
    sizes = sorted({r.run.n_params for r in runs})
    cosine: dict[float, list[RunSummary]] = {}
    for r in runs:
        if r.run.config.get("schedule") == "cosine":
            cosine.setdefault(r.run.n_params, []).append(r)
    cells: dict[str, dict[str, Any]] = {}
    for r in runs:
        name, scale = str(r.run.config.get("schedule", "")), _scale_rank(r.run.n_params, sizes)
        c = cells.setdefault(f"{name}@{scale}", {"schedule": name, "scale": scale, "model": r.run.model,
                                                 "preserved": [], "spikes": [], "ratio": []})
        c["preserved"].append(bool(r.phases.preserved) if r.phases.decidable else None)
        c["spikes"].append(int(r.phases.n_spikes) if r.phases.decidable else None)
        base = cosine.get(r.run.n_params)
        c["ratio"].append(r.final / sharpness_mean(base, lambda b: b.final) if base else math.nan)
    for c in cells.values():  # None: no run of the cell was decidable (too many failed measurements)
        known = [v for v in c["preserved"] if v is not None]
        c["preserved"] = float(np.mean(known)) if known else None
        spikes = [v for v in c["spikes"] if v is not None]
        c["spikes"] = float(np.mean(spikes)) if spikes else None
        c["ratio"] = float(np.nanmean(c["ratio"])) if np.isfinite(c["ratio"]).any() else math.nan
    return cells


@claim
def no_schedules(s: Scales) -> Claim | None:
    """Stands in for the schedule claims when the study has no schedule runs."""
    if s.cells:
        return None
    return Claim("schedules", "Learning-rate schedules shape the trajectory.", "schedule runs",
                 math.nan, UNCLEAR, "the study has no schedule runs")


@claim
def restart_spikes(s: Scales) -> Claim | None:
    restarts = [c for c in s.cells.values() if c["schedule"] == "cosine_restarts"]
    if not restarts:
        return None
    cosine = {c["scale"]: c for c in s.cells.values() if c["schedule"] == "cosine"}
    pairs = [(c["scale"], c["spikes"], (cosine.get(c["scale"]) or {}).get("spikes")) for c in restarts]
    known = [(scale, ours, base) for scale, ours, base in pairs if ours is not None and base is not None]
    k = sum(ours > base for _, ours, base in known)
    return Claim(
        "restart_spikes", "Warm restarts make sharpness spike at each restart.",
        "scales where the restarts run shows more sharpness spikes than cosine (holds ≥ 2/3, fails ≤ 1/3; "
        "scales whose runs the detector cannot read are left out)",
        k / len(known) if known else math.nan, fraction_verdict(k, len(known)),
        "; ".join(f"{scale}: {ours:.0f} spikes vs cosine {base:.0f}" for scale, ours, base in known)
        + (f"; {len(pairs) - len(known)} scale(s) undecidable" if len(known) < len(pairs) else ""),
        n=len(known))


@claim
def schedule_pattern(s: Scales) -> Claim | None:
    if not s.cells:
        return None
    pattern = {k: c["preserved"] for k, c in sorted(s.cells.items()) if c["preserved"] is not None}
    return Claim(
        "schedule_pattern", "Cosine and linear decay keep the three phases at every scale; constant and WSD break them "
        "only at the smallest scale; restarts break them at the small and middle scales.",
        "cells (schedule × scale) whose three-phase outcome matches the simulated study's (compare)",
        float(np.mean([v >= 0.5 for v in pattern.values()])), UNCLEAR,
        ", ".join(f"{k}: {'yes' if v >= 0.5 else 'no'}" for k, v in pattern.items()), n=len(pattern),
        details={"preserved": pattern})


@claim
def schedule_final(s: Scales) -> Claim | None:
    if not s.cells:
        return None
    ratios = {k: c["ratio"] for k, c in sorted(s.cells.items()) if c["schedule"] != "cosine"}
    # seed-to-seed spread of final sharpness at the schedule sizes: below it a ratio says nothing
    sched_models = {c["model"] for c in s.cells.values()}
    cvs = [row["final_sharpness_std"] / row["final_sharpness"] for row in s.analysis.tables.get("scales", [])
           if row["model"] in sched_models and math.isfinite(row.get("final_sharpness_std", math.nan))]
    noise_cv = float(np.mean(cvs)) if cvs else math.nan
    values = list(ratios.values())
    return Claim(
        "schedule_final", "Schedules change the final sharpness relative to cosine in the simulated directions.",
        "final sharpness / cosine's at the same scale, per cell; direction compared with the simulation (compare)",
        float(np.nanmean(values)) if ratios and np.isfinite(values).any() else math.nan,
        UNCLEAR, ", ".join(f"{k}: {v:.3f}" for k, v in ratios.items()), n=len(ratios),
        details={"ratio": ratios, "noise_cv": noise_cv})


# --- prediction, agreement between measures, the 2/lr line ------------------------------

@claim
def early_prediction(s: Scales) -> Claim:
    statement = "Final sharpness can be predicted from the first 10–20% of training."
    rows = [row for row in s.analysis.tables.get("early_prediction", []) if math.isfinite(row.get("loo_r2", math.nan))]
    if not rows:
        return Claim("early_prediction", statement, "leave-one-out R² (needs ≥ 4 runs)", math.nan, UNCLEAR,
                     "too few runs to fit")
    best = max(rows, key=lambda row: row["loo_r2"])
    loo = best["loo_r2"]
    return Claim(
        "early_prediction", statement,
        "leave-one-out R² of final ~ early mean + log10 N (holds ≥ 0.8, fails < 0.5)", loo,
        HOLDS if loo >= 0.8 else FAILS if loo < 0.5 else UNCLEAR,
        "; ".join(f"{row['horizon']:.0%}: R² {fmt(row['r2'])}, LOO {fmt(row['loo_r2'])}, log N alone "
                  f"{fmt(row['r2_log_n_only'])} (n = {row['n_runs']})" for row in rows),
        n=best["n_runs"], details={f"{row['horizon']:g}": row for row in rows})


@claim
def measures_agree(s: Scales) -> Claim:
    statement = "Critical sharpness, λ_max and trace per parameter agree across scales."
    by_scale = s.analysis.tables.get("measures_by_scale", [])
    names = [m for m in ("critical", "lambda_max", "trace_per_param") if by_scale and f"final_{m}" in by_scale[0]]
    if len(names) < 2:
        return Claim("measures_agree", statement, "Pearson r of final values between measures", math.nan, UNCLEAR,
                     "the runs log fewer than two measures")
    pairs = {f"{m1}~{m2}": pearson_test([row[f"final_{m1}"] for row in by_scale], [row[f"final_{m2}"] for row in by_scale])
             for i, m1 in enumerate(names) for m2 in names[i + 1:]}
    verdicts = [signed_verdict(r, p, +1) for r, p, _ in pairs.values()]
    verdict = HOLDS if all(v == HOLDS for v in verdicts) else FAILS if any(v == FAILS for v in verdicts) else UNCLEAR
    worst = min((v[0] for v in pairs.values() if math.isfinite(v[0])), default=math.nan)
    return Claim(
        "measures_agree", statement,
        "Pearson r of final values between each pair of measures across sizes; holds when every pair holds",
        worst, verdict, "; ".join(f"{k}: r {fmt(v[0])}, {fmt_p(v[1])}" for k, v in pairs.items()),
        n=len(by_scale), details={k: {"r": v[0], "p": v[1]} for k, v in pairs.items()})


@claim
def edge_of_stability(s: Scales) -> Claim:
    edge = np.array([r.edge_ratio for r in s.runs], dtype=float)
    above = np.array([r.frac_above_edge for r in s.runs], dtype=float)
    if np.isfinite(edge).any():
        med = float(np.nanmedian(edge))
        verdict = HOLDS if 0.5 <= med <= 1.5 else FAILS if (med < 0.25 or med > 2.0) else UNCLEAR
        per_size = ", ".join(f"{g[0].run.model} {v:.3g}" for g, v in zip(s.models, s.means(lambda r: r.edge_ratio)))
        summary = f"median λ_c/(2/lr) {med:.3g} (per size {per_size}); {float(np.nanmean(above)):.1%} of measurements above the line"
    else:
        med, verdict, summary = math.nan, UNCLEAR, "no lr logged beside the sharpness"
    return Claim(
        "edge_of_stability", "After warmup, training sits at the edge of stability (critical sharpness near 2/lr). "
        "Not a claim of the simulated study, whose sharpness has arbitrary units: its column here is not a result.",
        "median of λ_c·lr/2 over t ≥ 0.1 across scale runs (holds in [0.5, 1.5], fails < 0.25 or > 2)",
        med, verdict, summary, n=int(np.isfinite(edge).sum()),
        details={"frac_above": float(np.nanmean(above)) if np.isfinite(above).any() else math.nan})
