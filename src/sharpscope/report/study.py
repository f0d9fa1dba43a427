"""The measured study's report: its analysis, the comparison with the simulated study, and
(when present) the data-mix advisor and the Nexus diagnostics, in one HTML page."""

from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path
from typing import Any

from ..analysis.claims import FAILS, HOLDS, UNCLEAR
from ..analysis.compare import compare_summaries, comparison_markdown, load_summary, verdict_counts
from ..analysis.study import AnalysisOptions, analyze_runs
from ..analysis.tables import to_csv
from ..errors import UserError
from ..runs import atomic_write_text, find_runs, json_safe, read_study
from .build import ReportResult, write_analysis_report
from .html import table_html

VERDICT_COLOURS = {HOLDS: "#1a7f37", FAILS: "#b42318", UNCLEAR: "#7a5c00"}


def simulated_summary(seed: int = 42) -> dict[str, Any]:
    """The default simulated study's summary, computed afresh (about a second)."""
    from ..simulation import SimulationConfig, write_study

    with tempfile.TemporaryDirectory(prefix="sharpscope-sim-") as tmp:
        write_study(SimulationConfig(seed=seed), tmp)
        return json_safe(analyze_runs(read_study(tmp)).summary)


def summary_of(path: str | Path, options: AnalysisOptions | None = None) -> dict[str, Any]:
    """A summary from a report directory (summary.json) or from a directory of runs."""
    path = Path(path)
    if (path / "summary.json").is_file() or path.is_file():
        return load_summary(path)
    if path.is_dir() and find_runs(path):
        return json_safe(analyze_runs(read_study(path), options).summary)
    raise UserError(f"'{path}' is neither a report (with summary.json) nor a directory of runs")


def write_comparison(rows: list[dict[str, Any]], out: Path) -> None:
    atomic_write_text(out / "comparison.json", json.dumps(json_safe(rows), indent=2, allow_nan=False) + "\n")
    atomic_write_text(out / "comparison.md", "# The simulated study's claims against measured runs\n\n"
                      + comparison_markdown(rows))
    atomic_write_text(out / "comparison.csv", to_csv(rows))


def comparison_html(rows: list[dict[str, Any]]) -> str:
    counts = verdict_counts(rows)
    head = (f"<p>{counts[HOLDS]} claim(s) hold, {counts[FAILS]} do not hold and {counts[UNCLEAR]} are inconclusive "
            "on the measured runs. Each verdict names its test; the simulated column is the same statistic "
            "computed by the same code on the simulated study.</p>")
    body = ["<table class='claims'><thead><tr><th>claim</th><th>simulated</th><th>measured</th>"
            "<th>verdict</th><th>test</th></tr></thead><tbody>"]
    for r in rows:
        colour = VERDICT_COLOURS.get(r["verdict"], "#333")
        body.append(f"<tr><td><b>{html.escape(r['claim'])}</b><br><span class='note'>{html.escape(r['statement'])}</span></td>"
                    f"<td>{html.escape(str(r['simulated']))}</td><td>{html.escape(str(r['measured']))}</td>"
                    f"<td style='color:{colour};font-weight:600'>{html.escape(r['verdict'])}</td>"
                    f"<td class='note'>{html.escape(r['statistic'])}</td></tr>")
    body.append("</tbody></table>")
    return head + "".join(body)


def read_plan(study_dir: Path) -> list[dict[str, Any]]:
    """The planned runs of a study (study.json), or [] for a plain directory of runs."""
    path = Path(study_dir) / "study.json"
    if not path.is_file():
        return []
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("runs", [])
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{path} is not a study plan; re-run sharpscope study with the same config to rewrite it") from None


def _grid_html(plan: list[dict[str, Any]], unfinished: list[str]) -> str:
    if not plan:
        return ""
    rows = [{"run": r["name"], "n_params": r["n_params"], "seed": r["seed"], "schedule": r["schedule"],
             "steps": r["steps"], "tokens": r["tokens"], "groups": ",".join(r["groups"]),
             "finished": r["name"] not in unfinished} for r in plan]
    return "<p class='note'>The grid as planned (study.json).</p>" + table_html(rows)


def finished_runs(plan: list[dict[str, Any]], runs: list) -> tuple[list, list[str]]:
    """The runs that reached their planned last step, and the names of the rest (planned
    runs still training or not started): a run still training would bias every final value."""
    planned = {r["name"]: r["steps"] for r in plan}
    done = [run for run in runs if max((row["step"] for row in run.metrics), default=0) >= planned.get(run.name, 0)]
    names = {run.name for run in done}
    return done, [name for name in planned if name not in names]


def write_study_report(study_dir: str | Path, out: str | Path, *, title: str = "Measured sharpness study",
                       figures: bool = True, simulated: str | Path | None = None,
                       options: AnalysisOptions | None = None) -> Path:
    """Analyse OUT/runs of a study, compare with the simulated study and write one report.

    ``simulated``: a simulated report or run directory to compare against (default: the
    default simulated study, recomputed)."""
    study_dir, out = Path(study_dir), Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' exists and is not a directory; choose another --out")
    runs_dir = study_dir / "runs" if (study_dir / "runs").is_dir() else study_dir
    plan = read_plan(study_dir)
    runs, unfinished = finished_runs(plan, read_study(runs_dir))
    if not runs:
        raise UserError(f"no finished runs under '{runs_dir}' yet; let sharpscope study finish some runs first")
    analysis = analyze_runs(runs, options)
    sim = summary_of(simulated) if simulated else simulated_summary()
    rows = compare_summaries(sim, json_safe(analysis.summary))
    sections = [("comparison", "The simulated study's claims on measured runs", comparison_html(rows))]
    extra_figures: dict[str, Path] = {}
    for anchor, heading, render in _optional_sections():
        block = render(study_dir, out)
        if block is not None:
            body, figs = block
            sections.append((anchor, heading, body))
            extra_figures.update(figs)
    grid = _grid_html(plan, unfinished)
    if unfinished:
        grid += (f"<p class='note'>Left out of the analysis, not finished yet: {html.escape(', '.join(unfinished))}. "
                 "Re-run the study command to finish them.</p>")
    if grid:
        sections.append(("grid", "The grid", grid))
    result: ReportResult = write_analysis_report(analysis, out, figures=figures, title=title, sections=sections,
                                                 extra_figures=extra_figures)
    write_comparison(rows, out)
    return result.html or out / "summary.json"


def _optional_sections():
    """(anchor, heading, render(study_dir, out) -> (html, figures) or None) of the parts a
    study may hold besides its runs."""
    from . import study_extras

    return study_extras.SECTIONS
