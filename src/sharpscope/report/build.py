"""Analyse a study directory and write tables, summary, figures and the HTML report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..analysis.runset import analyze_any
from ..analysis.study import AnalysisOptions, StudyAnalysis
from ..analysis.tables import write_summary, write_tables
from ..errors import UserError
from ..runs import read_study


@dataclass
class ReportResult:
    analysis: StudyAnalysis
    out: Path
    tables: list[Path] = field(default_factory=list)
    figures: dict[str, Path] = field(default_factory=dict)
    html: Path | None = None


def write_report(study: str | Path, out: str | Path, *, figures: bool = True,
                 options: AnalysisOptions | None = None, title: str | None = None,
                 groups: Sequence[str] | None = None) -> ReportResult:
    """Read every run under ``study`` (one run, or any tree of runs), analyse, and write the
    report under ``out``: the study report for a complete study, else a run report
    (:func:`~sharpscope.analysis.runset.analyze_any`; ``groups``: the runs to fit across).

    Everything is analysed before anything is written, so a bad input leaves an existing
    report untouched; each file is then replaced atomically.
    """
    study, out = Path(study), Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output '{out}' exists and is not a directory; choose another --out")
    analysis = analyze_any(read_study(study), options, groups)
    if title is None:
        title = "sharpscope study report" if analysis.kind == "study" else "sharpscope run report"
    return write_analysis_report(analysis, out, figures=figures, title=title)


def write_analysis_report(analysis: StudyAnalysis, out: str | Path, *, figures: bool = True,
                          title: str = "sharpscope study report", sections: list[tuple[str, str, str]] | None = None,
                          extra_figures: dict[str, Path] | None = None) -> ReportResult:
    """Tables, summary, figures and HTML of an analysis already made; ``sections`` are
    (anchor, title, HTML body) blocks placed after the headline."""
    out = Path(out)
    result = ReportResult(analysis=analysis, out=out)
    result.tables = write_tables(analysis.tables, out)
    write_summary(analysis.summary, out)
    if figures:
        from .figures import write_figures  # matplotlib only when figures are wanted
        from .html import write_html

        result.figures = {**write_figures(analysis, out), **(extra_figures or {})}
        result.html = write_html(analysis, result.figures, out, title, sections=sections)
    return result
