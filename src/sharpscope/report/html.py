"""A self-contained HTML report: headline statistics, every table, every figure embedded."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from ..analysis.runset import describe_run, ordered, run_keys
from ..analysis.study import StudyAnalysis
from ..analysis.tables import format_value
from ..runs import atomic_write_text

FIGURE_CAPTIONS = {
    "trajectories": "Sharpness over training at each size: single measurements faint, the smoothed curve "
                    "(for a line search 2/⟨η_c⟩ over a rolling window, uphill updates counted as η_c = 0) with its "
                    "90% bootstrap interval, the 2/lr line dashed; ▲ at the top edge: an uphill update (not_descent, "
                    "λ_c = ∞).",
    "loss": "Training loss over training at each scale.",
    "accuracy": "Downstream accuracy per task and its mean against model size.",
    "scaling_law": "Final sharpness against model size with the log-linear and power-law fits.",
    "sharpness_gradient": "Sharpness against gradient norm within each run, and the within-run correlations by scale.",
    "sharpness_accuracy": "Final sharpness against mean downstream accuracy across scales.",
    "ablations": "One-factor ablations: peak-to-plateau ratio and whether the three-phase pattern survives.",
    "pac_bayes": "The PAC-Bayes bound as written (explicit δ) and the source's variant.",
    "measures": "Critical sharpness, λ_max and trace per parameter over training.",
    "schedules": "Sharpness under each learning-rate schedule, drawn as in the trajectories figure, each schedule's "
                 "own 2/lr dashed in its colour.",
    "extrapolation": "Log-linear extrapolation with 95% intervals of the fitted mean, against observed values.",
    "phases": "Sharpness in the three fixed windows (for a line search 2/⟨η_c⟩ over the window).",
    "training": "Measured training runs: critical sharpness along the optimizer's update against 2/lr, λ_max, and the losses.",
    "overlay": "Every run's sharpness over training progress t (and training loss), side by side.",
}

TABLE_TITLES = {
    "scales": "Scales", "downstream": "Downstream accuracy", "correlations": "Within-run correlations",
    "phases": "Phases", "pac_bayes": "PAC-Bayes bound", "measures": "Three measures: log-linear fits",
    "measures_by_scale": "Three measures: final values", "schedules": "Schedules", "ablations": "Ablations",
    "extrapolation": "Extrapolation", "early_prediction": "Early prediction of final sharpness",
    "training": "Measured training runs", "claims": "The simulated study's claims tested on these runs",
    "runs": "Runs",
}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.7em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:.25em .55em;text-align:right}th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}figure{margin:1.2em 0}
img{max-width:100%;border:1px solid #eee}figcaption{font-size:.85em;color:#555}
.headline td{text-align:left}.claims td{text-align:left;vertical-align:top}.note{color:#666;font-size:.9em}
"""


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p class='note'>No rows: the study has no runs of this kind.</p>"
    cols: list[str] = []
    for row in rows:
        cols += [c for c in row if c not in cols]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_value(row.get(c)))}</td>" for c in cols) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _headline(a: StudyAnalysis) -> list[tuple[str, str]]:
    if a.kind == "runs":
        items = [("Runs analysed", f"{a.summary['n_runs']} ({', '.join(a.summary['sources'])})"),
                 ("Across sizes", "; ".join(a.notes))]
        # with a ladder of 3 sizes the study's headline follows (its own run count aside)
        return items + (_study_headline(a)[1:] if a.scaling is not None else [])
    return _study_headline(a)


def _study_headline(a: StudyAnalysis) -> list[tuple[str, str]]:
    s = a.summary
    f = s["scaling_law"]
    items = [
        ("Runs analysed", f"{s['n_runs']} ({', '.join(s['sources'])})"),
        ("Log-linear law", f"S_final = {f['slope']:.4f}·log10 N + {f['intercept']:.4f}, R² = {f['r2']:.4f}, r = {f['r']:.4f}"),
        ("Log-linear vs power law (AIC)", f"{f['aic_loglinear']:.2f} vs {f['aic_power']:.2f} (power-law R² {f['power_r2']:.4f}); preferred: {f['preferred']}"),
        ("Leave-one-out relative error", f"mean {f['loo_mean_pct']:.2f}%, max {f['loo_max_pct']:.2f}%"),
        ("r(final sharpness, accuracy)", format_value(s["r_final_sharpness_accuracy"])),
        ("r(final sharpness, final loss)", format_value(s["r_final_sharpness_loss"])),
        ("Peak-to-plateau ratio", ", ".join(f"{k}: {v:.2f}" for k, v in s["peak_to_plateau"].items())),
        ("Sharpness–gradient coupling", ", ".join(f"{k}: {v:.3f}" for k, v in s["coupling_sharpness_grad_norm"].items())),
        ("Three-phase pattern (scale runs)", s["three_phase_scales"]),
    ]
    if s["ablations_by_factor"]:
        items.append(("Ablations keeping the pattern", f"{s['ablations_preserved']} "
                      f"({', '.join(f'{k} {v}' for k, v in s['ablations_by_factor'].items())})"))
    if s["measure_correlations"]:
        items.append(("Cross-measure correlation of finals",
                      ", ".join(f"{k}: {v:.4f}" for k, v in s["measure_correlations"].items())))
    for h, e in s.get("early_prediction", {}).items():  # a run report leaves it out below 4 runs
        items.append((f"Early prediction from the first {float(h):.0%}",
                      f"R² {format_value(e['r2'])} in sample, {format_value(e['loo_r2'])} leave-one-out (n = {e['n']})"))
    return items


def figure_html(name: str, path: Path, caption: str | None = None) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    caption = caption or FIGURE_CAPTIONS.get(name, name)
    return (f"<figure id='fig-{html.escape(name)}'><img alt='{html.escape(caption)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def table_html(rows: list[dict[str, Any]]) -> str:
    return _table(rows)


def runs_html(a: StudyAnalysis, figures: dict[str, Path]) -> str:
    """A run report's section: per run, its reading in one line and its figure."""
    rows = {row["run"]: row for row in a.tables.get("runs", [])}
    parts = [f"<p class='note'>One figure per run: every sharpness measure it logs over training progress t "
             f"(<code>{html.escape(a.options.metric)}</code> first, against the 2/lr line; failed measurements "
             "marked at the edges: ▲ at the top for an uphill update, not_descent, λ_c = ∞; × at the bottom for "
             "no value), then its losses. Columns of every run: the Runs table.</p>"]
    for r, label, key in run_keys(ordered(a.runs)):
        row = rows.get(label, {})
        about = f"{r.run.n_params:,.0f} parameters, group {', '.join(r.run.groups)}, {r.run.config.get('source', '')}"
        parts.append(f"<h3 id='run-{html.escape(key)}'>{html.escape(label)}</h3>"
                     f"<p>{html.escape(about)}: {html.escape(describe_run(row))}</p>")
        name = f"run-{key}"
        if name in figures:
            parts.append(figure_html(name, figures[name], f"{label}: sharpness and loss over training"))
    return "\n".join(parts)


def render_html(a: StudyAnalysis, figures: dict[str, Path], title: str = "sharpscope study report",
                sections: list[tuple[str, str, str]] | None = None) -> str:
    if a.kind == "runs":
        sections = [("runs", "Runs", runs_html(a, figures))] + list(sections or [])
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='note'>Metric: <code>{html.escape(a.options.metric)}</code>. Final value = {a.options.final_statistic} of the "
             "last 10% of logged points; peak = maximum; phase windows t &lt; 0.2, 0.2 ≤ t &lt; 0.6, t ≥ 0.6.</p>",
             "<h2>Headline</h2><table class='headline'><tbody>"]
    parts += [f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _headline(a)]
    parts.append("</tbody></table>")
    placed = set()
    for anchor, heading, body in sections or []:
        parts.append(f"<h2 id='{html.escape(anchor)}'>{html.escape(heading)}</h2>{body}")
        placed.update(name for name in figures if f"id='fig-{name}'" in body)
    parts.append("<h2>Figures</h2>")
    for name, path in figures.items():
        if name not in placed:
            parts.append(figure_html(name, path))
    parts.append("<h2>Tables</h2>")
    for name, rows in a.tables.items():
        parts.append(f"<h3 id='table-{name}'>{html.escape(TABLE_TITLES.get(name, name))}</h3>{_table(rows)}")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(a: StudyAnalysis, figures: dict[str, Path], out: Path, title: str = "sharpscope study report",
               sections: list[tuple[str, str, str]] | None = None) -> Path:
    path = Path(out) / "report.html"
    atomic_write_text(path, render_html(a, figures, title, sections))
    return path
