"""Any set of runs, not only a study: a reading of each run, and the cross-scale analysis
only where the runs hold a ladder of at least 3 model sizes (numpy/scipy only).

``sharpscope analyze`` reads whatever it is given: one run written by a training callback,
a folder of trained runs under user labels, or a whole simulated or measured study.

* A complete study - every run logs the metric and the ``scales`` group holds at least 3
  model sizes with a finite final value - gets the study analysis exactly as
  :func:`~sharpscope.analysis.study.analyze_runs` makes it (``kind == "study"``).
* Anything else gets a run report (``kind == "runs"``): a row per run (final, peak, phase
  means, three-phase reading, edge-of-stability ratio, failed share), and the cross-scale
  analysis over the ladder :func:`choose_ladder` picks, when there is one; otherwise one
  line says why not.

The ladder (the runs fitted across sizes):

1. the groups the user names (``--group a,b``);
2. otherwise the group holding the most sizes, if it holds at least 3 (ties: ``scales``,
   then the most runs, then the name). ``schedules``, ``ablations`` and ``extrapolation``
   vary a ladder and never form one. Three callback runs of different sizes, all labelled
   ``training`` (or one user label), are fitted across: a label is how a user says
   "these runs belong together";
3. otherwise, when every group holds one size and no two groups share a size (labels used
   as size names: ``small``, ``medium``, ``large``), all of them together;
4. otherwise none: runs under different labels at mixed sizes may differ in more than
   size (optimizer, data), and a fit across them would mix those differences in.

Sizes are counted over runs with a finite final value of the metric: a run whose every
measurement failed cannot enter a fit.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import UserError
from ..runs import Run
from ..sizes import size_label
from .phases import MIN_POINTS, final_value
from .study import analyze_summaries
from .summaries import MEASURES, AnalysisOptions, RunSummary, StudyAnalysis, by_model, summarize_run
from ..metrics import EVALS, FAILED_PREFIX, PRECONDITIONED, SHARPNESS_PREFIX

VARIANT_GROUPS = ("schedules", "ablations", "extrapolation")
"""Groups that vary a ladder (schedules, ablations, sizes to extrapolate to) rather than form one."""
MIN_SIZES = 3
"""A line through two points has no residual: the fits, their intervals and the claims' tests
need at least three sizes."""


@dataclass
class Ladder:
    """The runs fitted across sizes, or the reason there are none."""

    groups: tuple[str, ...]
    runs: list[RunSummary]
    sizes: list[float]
    fitted: bool
    note: str
    """One line: what is fitted, or why nothing is."""


def _finite(r: RunSummary) -> bool:
    return math.isfinite(r.final)


def _sizes(runs: Sequence[RunSummary]) -> list[float]:
    return sorted({r.run.n_params for r in runs if _finite(r)})


def _quote(groups: Sequence[str]) -> str:
    return ", ".join(f"'{g}'" for g in groups)


def _ladder(groups: tuple[str, ...], members: list[RunSummary], metric: str, where: str,
            extra: str = "") -> Ladder:
    fit = [r for r in members if _finite(r)]
    sizes = _sizes(fit)
    dropped = len(members) - len(fit)
    why = f" ({dropped} run(s) without a finite final {metric} left out)" if dropped else ""
    if len(sizes) >= MIN_SIZES:
        note = (f"cross-scale fit over {where}: {len(sizes)} sizes "
                f"({', '.join(size_label(n) for n in sizes)}){why}{extra}")
        return Ladder(groups, fit, sizes, True, note)
    note = (f"cross-scale fits need runs of at least {MIN_SIZES} sizes; {where} has {len(sizes)}{why} "
            "— fits skipped")
    return Ladder(groups, [], sizes, False, note)


def choose_ladder(summaries: list[RunSummary], metric: str, groups: Sequence[str] | None = None) -> Ladder:
    """The runs to fit across sizes, by the rule in the module docstring."""
    if groups:
        known = sorted({g for r in summaries for g in r.run.groups})
        unknown = [g for g in groups if g not in known]
        if unknown:
            raise UserError(f"--group {unknown[0]}: no run has this group; the runs' groups are {_quote(known)}")
        members = [r for r in summaries if set(groups) & set(r.run.groups)]
        where = f"group {_quote(groups)}" if len(groups) == 1 else f"groups {_quote(groups)}"
        return _ladder(tuple(groups), members, metric, where)
    by_group: dict[str, list[RunSummary]] = {}
    for r in summaries:
        for g in r.run.groups:
            if g not in VARIANT_GROUPS:
                by_group.setdefault(g, []).append(r)
    ranked = sorted(by_group, key=lambda g: (-len(_sizes(by_group[g])), g != "scales", -len(by_group[g]), g))
    if ranked and len(_sizes(by_group[ranked[0]])) >= MIN_SIZES:
        best = ranked[0]
        others = [g for g in ranked[1:] if len(_sizes(by_group[g])) >= MIN_SIZES]
        extra = (f"; {_quote(others)} also hold at least {MIN_SIZES} sizes (--group NAME fits another)"
                 if others else "")
        return _ladder((best,), by_group[best], metric, f"group '{best}'", extra)
    sized = {g: _sizes(rs) for g, rs in by_group.items() if _sizes(rs)}
    every_size = sorted({n for v in sized.values() for n in v})
    if (len(every_size) >= MIN_SIZES and all(len(v) == 1 for v in sized.values())
            and sum(len(v) for v in sized.values()) == len(every_size)):
        names = tuple(sorted(sized))
        members = [r for r in summaries if set(names) & set(r.run.groups)]
        return _ladder(names, members, metric, f"groups {_quote(names)} (one size each)")
    dropped = sum(not _finite(r) for rs in by_group.values() for r in rs)
    why = f" ({dropped} run(s) without a finite final {metric} left out)" if dropped else ""
    if len(every_size) >= MIN_SIZES:
        best = max(sized, key=lambda g: (len(sized[g]), g == "scales"))
        note = (f"cross-scale fits need runs of at least {MIN_SIZES} sizes in one group; '{best}' has "
                f"{len(sized[best])} of the {len(every_size)} sizes here{why} — fits skipped "
                f"(--group {','.join(sorted(sized))} fits across the groups)")
    else:
        note = f"cross-scale fits need runs of at least {MIN_SIZES} sizes; these runs have {len(every_size)}{why} — fits skipped"
    return Ladder((), [], every_size, False, note)


def distinct_models(runs: list[Run]) -> list[Run]:
    """The runs, with a model label that spans several sizes suffixed by the size.

    Runs of one ``model`` label are averaged as seeds of one model; the label defaults to
    the run name, and a callback names every run alike unless told otherwise, so three
    callback runs of three sizes would otherwise read as one model. Only the in-memory
    config changes (the files are not touched)."""
    sizes: dict[str, set[float]] = {}
    for run in runs:
        sizes.setdefault(run.model, set()).add(run.n_params)
    out = []
    for run in runs:
        if len(sizes[run.model]) > 1:
            run = Run(path=run.path, config={**run.config, "model": f"{run.model} {size_label(run.n_params)}"},
                      metrics=run.metrics, line_numbers=run.line_numbers)
        out.append(run)
    return out


def is_complete_study(summaries: list[RunSummary]) -> bool:
    """Whether :func:`~sharpscope.analysis.study.analyze_runs` reads these runs as a study:
    every run logs the metric, and the 'scales' group holds at least 3 model sizes, each
    with a finite final value."""
    if any(r.t.size == 0 for r in summaries):
        return False
    models = by_model([r for r in summaries if "scales" in r.run.groups])
    if len(models) < MIN_SIZES or len({g[0].run.n_params for g in models}) < MIN_SIZES:
        return False
    return all(any(_finite(r) for r in g) for g in models)


def phase_verdict(r: RunSummary) -> str:
    """"yes" (rise, decay, plateau), "no", or "undecidable" (too few finite measurements to
    read a shape at all)."""
    if r.phases.preserved:
        return "yes"
    if not r.phases.decidable or r.measured_points < MIN_POINTS:
        return "undecidable"
    return "no"


# Columns of the runs table that only some writers log: left out when no run has them.
OPTIONAL_COLUMNS = ("final_loss", "final_eval_loss", "final_lambda_max", "final_trace_per_param",
                    "final_preconditioned", "r_sharpness_loss", "median_evals")


def run_row(r: RunSummary, opts: AnalysisOptions) -> dict[str, Any]:
    """One run: its measurements, the sharpness summary and its reading against 2/lr."""
    run = r.run
    _, evals = run.series(EVALS)
    evals = evals[np.isfinite(evals)]
    _, precond = run.series(PRECONDITIONED)
    n_params = run.n_params
    row: dict[str, Any] = {
        "run": run.name, "model": run.model, "group": ",".join(run.groups),
        "source": str(run.config.get("source", "")),
        "n_params": int(n_params) if float(n_params).is_integer() else n_params,
        "steps": max((row["step"] for row in run.metrics), default=0),
        "measurements": int(r.sharpness.size), "failed_share": r.failed_share,
        "failed": ", ".join(f"{k} {v}" for k, v in r.failed_reasons.items() if v),
        "peak_sharpness": r.peak, "final_sharpness": r.final,
        "phase1": r.phase_means[0], "phase2": r.phase_means[1], "phase3": r.phase_means[2],
        "three_phase": phase_verdict(r), "reason": r.phases.reason,
        "t_peak": r.phases.t_peak, "t_plateau": r.phases.t_plateau,
        "edge_ratio": r.edge_ratio, "frac_above_edge": r.frac_above_edge,
        "final_loss": r.final_loss, "final_eval_loss": r.final_val_loss,
        **{f"final_{name}": r.measure_finals.get(name, math.nan) for name, key in MEASURES.items()
           if key != opts.metric},
        "final_preconditioned": (final_value(precond, statistic=opts.final_statistic)
                                 if opts.metric != PRECONDITIONED else math.nan),
        "r_sharpness_loss": r.r_loss,
        "median_evals": float(np.median(evals)) if evals.size else math.nan,
    }
    return row


def _present(value: Any) -> bool:
    return not (value is None or (isinstance(value, float) and not math.isfinite(value)))


def ordered(summaries: list[RunSummary]) -> list[RunSummary]:
    """Runs by size, then name: the order of the runs table, figures and report."""
    return sorted(summaries, key=lambda r: (r.run.n_params, r.run.name, str(r.run.path)))


def run_labels(summaries: list[RunSummary]) -> list[str]:
    """A name per run that tells it apart: its ``name`` when unique, else its directory
    relative to the runs' common folder (trainers and callbacks give every run one default
    name unless told otherwise)."""
    names = [r.run.name for r in summaries]
    if len(set(names)) == len(names):
        return names
    paths = [r.run.path.resolve() for r in summaries]
    root = Path(os.path.commonpath(paths)) if len(paths) > 1 else paths[0].parent
    labels = []
    for r, path in zip(summaries, paths):
        rel = path.relative_to(root).as_posix() if path != root else path.name
        labels.append(r.run.name if names.count(r.run.name) == 1 else f"{r.run.name} ({rel})")
    return labels


def run_keys(runs: list[RunSummary]) -> list[tuple[RunSummary, str, str]]:
    """(run, label, key) per run: a file-name-safe key, unique among the runs, that names
    the run's figure and its place in the report."""
    out, used = [], set()
    for r, label in zip(runs, run_labels(runs)):
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.") or "run"
        key, k = base, 2
        while key in used:
            key, k = f"{base}-{k}", k + 1
        used.add(key)
        out.append((r, label, key))
    return out


def runs_table(summaries: list[RunSummary], opts: AnalysisOptions) -> list[dict[str, Any]]:
    runs = ordered(summaries)
    rows = [{**run_row(r, opts), "run": label} for r, label in zip(runs, run_labels(runs))]
    absent = {c for c in OPTIONAL_COLUMNS if not any(_present(row.get(c)) for row in rows)}
    return [{k: v for k, v in row.items() if k not in absent} for row in rows]


def describe_run(row: dict[str, Any]) -> str:
    """One line reading a row of the runs table (the CLI prints it, the report shows it)."""
    def num(key: str) -> float:
        value = row.get(key)
        return float(value) if _present(value) else math.nan

    n = int(row.get("measurements") or 0)
    parts = [f"{n} measurement(s)" + (f", {num('failed_share'):.0%} failed" if n else "")
             + (f" ({row['failed']})" if row.get("failed") else "")]
    if math.isfinite(num("final_sharpness")):
        parts.append(f"final {num('final_sharpness'):.4g}, peak {num('peak_sharpness'):.4g}")
    else:
        parts.append("no finite measurement")
    verdict = row.get("three_phase")
    parts.append(f"three-phase: {verdict}" + (f" ({row['reason']})" if verdict != "yes" and row.get("reason") else ""))
    if math.isfinite(num("edge_ratio")):
        parts.append(f"median sharpness·lr/2 {num('edge_ratio'):.3g} for t ≥ 0.1, "
                     f"{num('frac_above_edge'):.0%} above the 2/lr line")
    if math.isfinite(num("final_loss")):
        parts.append(f"final loss {num('final_loss'):.4g}")
    return "; ".join(parts)


def _keep_table(name: str, rows: list[dict[str, Any]], a: StudyAnalysis) -> bool:
    """Which study tables a run report shows: those with something to say about these runs."""
    if name == "training":  # the runs table and the per-run figures say the same, for every run
        return False
    if name == "extrapolation":  # 13B-70B means nothing for arbitrary runs unless asked for
        return bool(a.options.extrapolate) or bool(a.group("extrapolation"))
    if name == "early_prediction":  # needs 4 runs; a row of NaN says nothing
        return any(_present(row.get("r2")) for row in rows)
    if name == "measures_by_scale":
        return bool(a.tables.get("measures"))
    return bool(rows)


def analyze_any(runs: list[Run], opts: AnalysisOptions | None = None,
                groups: Sequence[str] | None = None) -> StudyAnalysis:
    """A study's analysis when the runs are a complete study (and no other ``groups`` are
    asked for), else a run report; see the module docstring."""
    opts = opts or AnalysisOptions()
    summaries = [summarize_run(r, opts, require_metric=False) for r in runs]
    groups = [g for g in (groups or []) if g]
    if groups in ([], ["scales"]) and is_complete_study(summaries):
        return analyze_summaries(summaries, opts)
    if not any(r.t.size for r in summaries):
        logged = sorted({k for r in runs for k in r.keys() if k.startswith(SHARPNESS_PREFIX)
                         and not k.startswith(FAILED_PREFIX)})
        raise UserError(f"no run logs '{opts.metric}'; pick the sharpness metric with --metric"
                        + (f" (these runs log {', '.join(logged)})" if logged else ""))
    views = distinct_models([r.run for r in summaries])
    summaries = [dataclasses.replace(s, run=v) for s, v in zip(summaries, views)]
    # A series too short for the detector is undecidable here, as in the runs table: the
    # three-phase claim then leaves it out rather than counting it against the pattern
    # (callback runs are often short). A study keeps the detector's own reading.
    summaries = [dataclasses.replace(s, phases=dataclasses.replace(s.phases, decidable=False))
                 if phase_verdict(s) == "undecidable" else s for s in summaries]
    ladder = choose_ladder(summaries, opts.metric, groups)
    if ladder.fitted:
        out = analyze_summaries(summaries, opts, ladder=frozenset(r.run.path for r in ladder.runs))
        undecidable = sum(not r.phases.decidable for r in out.scale_runs())
        if undecidable:  # "0/3" alone would read as three runs without the pattern
            out.summary["three_phase_scales"] += f" ({undecidable} undecidable)"
    else:
        out = StudyAnalysis(runs=summaries, options=opts)
    out.kind = "runs"
    out.notes = [ladder.note]
    table = runs_table(summaries, opts)
    study_tables = out.tables
    out.tables = {"runs": table, **{k: v for k, v in study_tables.items() if _keep_table(k, v, out)}}
    study_summary = {k: v for k, v in out.summary.items()
                     if not (k in ("extrapolation", "early_prediction") and k not in out.tables)}
    out.summary = {
        "n_runs": len(summaries), "metric": opts.metric, "final_statistic": opts.final_statistic,
        "sources": sorted({str(r.run.config.get("source")) for r in summaries}),
        "cross_scale": {"fitted": ladder.fitted, "groups": list(ladder.groups), "n_sizes": len(ladder.sizes),
                        "sizes": ladder.sizes, "note": ladder.note},
        **{k: v for k, v in study_summary.items() if k not in ("n_runs", "metric", "final_statistic", "sources")},
        "runs": table,
    }
    return out
