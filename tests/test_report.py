"""The report: figures and the self-contained HTML, on the simulated study and a scales-only one."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser

import matplotlib.legend
import numpy as np
import pytest
from matplotlib import image as mpimg

from sharpscope.report.build import write_report
from sharpscope.simulation import SimulationConfig, write_study

FIGURES = {"trajectories", "loss", "accuracy", "scaling_law", "sharpness_gradient", "sharpness_accuracy",
           "ablations", "pac_bayes", "measures", "schedules", "extrapolation", "phases"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "study"
    write_study(SimulationConfig(), path)
    return path


@pytest.fixture(scope="module")
def full(study, tmp_path_factory):
    return write_report(study, tmp_path_factory.mktemp("full"), figures=True)


@pytest.fixture(scope="module")
def scales_only(study, tmp_path_factory):
    return write_report(study / "scales", tmp_path_factory.mktemp("scales_only"), figures=True)


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(html: str) -> list[tuple[str, dict]]:
    p = _Tags()
    p.feed(html)
    return p.tags


def _decode(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:60]
    return base64.b64decode(src[len(prefix):], validate=True)


# --- figures ----------------------------------------------------------------------------

def test_all_figures_exist(full):
    assert set(full.figures) == FIGURES
    on_disk = {p.stem for p in (full.out / "figures").glob("*.png")}
    assert on_disk == FIGURES
    for path in full.figures.values():
        assert path.read_bytes().startswith(PNG_SIGNATURE)


# --- self-contained HTML ----------------------------------------------------------------

def test_html_is_self_contained(full):
    html = (full.out / "report.html").read_text(encoding="utf-8")
    srcs = re.findall(r"""\bsrc\s*=\s*["']?([^"'\s>]*)""", html, flags=re.IGNORECASE)
    assert srcs, "no src attributes at all"
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:80]
    tags = _tags(html)
    for tag, attrs in tags:
        assert tag not in ("script", "link", "iframe"), tag
        for key in ("href", "src"):
            value = attrs.get(key) or ""
            assert not re.match(r"(https?:)?//", value), value


def test_one_img_per_figure_and_each_decodes(full):
    html = (full.out / "report.html").read_text(encoding="utf-8")
    imgs = [attrs for tag, attrs in _tags(html) if tag == "img"]
    pngs = sorted((full.out / "figures").glob("*.png"))
    assert len(imgs) == len(pngs) == len(FIGURES)
    files = {p.read_bytes() for p in pngs}
    embedded = set()
    for attrs in imgs:
        data = _decode(attrs["src"])
        assert data.startswith(PNG_SIGNATURE)
        pixels = mpimg.imread(io.BytesIO(data), format="png")
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert float(np.std(pixels)) > 0.01, "blank figure"
        embedded.add(data)
    assert embedded == files  # every figure on disk is embedded, byte for byte


def test_figures_by_id(full):
    html = (full.out / "report.html").read_text(encoding="utf-8")
    ids = {attrs.get("id") for tag, attrs in _tags(html) if tag == "figure"}
    assert ids == {f"fig-{name}" for name in FIGURES}


def test_headline_slope_matches_summary(full):
    html = (full.out / "report.html").read_text(encoding="utf-8")
    summary = json.loads((full.out / "summary.json").read_text())
    law = summary["scaling_law"]
    headline = html.split("<h2>Headline</h2>", 1)[1].split("<h2>", 1)[0]
    assert f"S_final = {law['slope']:.4f}·log10 N + {law['intercept']:.4f}" in headline
    assert f"R² = {law['r2']:.4f}" in headline
    assert summary["ablations_preserved"] in headline


def test_every_table_in_html(full):
    html = (full.out / "report.html").read_text(encoding="utf-8")
    for name in full.analysis.tables:
        assert f"id='table-{name}'" in html
    assert "No rows" not in html  # the full study has rows everywhere


# --- a study of only scale runs ---------------------------------------------------------

def test_scales_only_renders(scales_only):
    assert (scales_only.out / "report.html").is_file()
    assert scales_only.analysis.summary["n_runs"] == 6
    assert set(scales_only.figures) == FIGURES - {"schedules", "ablations"}
    assert not (scales_only.out / "figures" / "schedules.png").exists()
    assert not (scales_only.out / "figures" / "ablations.png").exists()


def test_scales_only_tables_say_no_rows(scales_only):
    html = (scales_only.out / "report.html").read_text(encoding="utf-8")
    for name in ("schedules", "ablations"):
        section = html.split(f"id='table-{name}'", 1)[1].split("<h3", 1)[0]
        assert "No rows" in section, name
        md = (scales_only.out / "tables" / f"{name}.md").read_text()
        assert "no rows" in md
    scales_section = html.split("id='table-scales'", 1)[1].split("<h3", 1)[0]
    assert "No rows" not in scales_section
    imgs = [attrs for tag, attrs in _tags(html) if tag == "img"]
    assert len(imgs) == len(FIGURES) - 2


def test_scales_only_extrapolates_to_defaults(scales_only):
    rows = scales_only.analysis.tables["extrapolation"]
    assert [r["n_params"] for r in rows] == [13e9, 30e9, 70e9]
    assert all(np.isnan(r["observed"]) for r in rows)


# --- figures of line-search critical sharpness: structure, not pixels ---------------------

def _line_search_run(root, name, n_params, scale, *, not_descent=(), spike=None, n=40):
    """A run as the trainer writes it: λ_c rising tenfold over training at lr 1e-3, a spike
    (η_c near 0⁺) and uphill updates (not_descent: null λ_c and η_c)."""
    from sharpscope.runs import write_run
    rows = []
    for i in range(n):
        t = i / (n - 1)
        lam = scale * (1 + 9 * t)
        row = {"step": i + 1, "t": t, "lr": 1e-3, "sharpness/evals": 5.0, "train/loss": 3 - t}
        if i in not_descent:
            row.update({"sharpness/critical": None, "sharpness/eta_c": None, "sharpness/failed/not_descent": 1.0})
        else:
            lam = 1000 * lam if i == spike else lam
            row.update({"sharpness/critical": lam, "sharpness/eta_c": 2 / lam})
        rows.append(row)
    write_run(root / name, {"name": name, "n_params": n_params, "source": "measured", "group": "scales"}, rows)
    return root / name


def _gids(ax, gid):
    return [a for a in ax.get_children() if a.get_gid() == gid]


def test_run_figure_has_stability_line_not_descent_marks_and_log_axis(tmp_path):
    import matplotlib.pyplot as plt
    from sharpscope.analysis.summaries import AnalysisOptions, summarize_run
    from sharpscope.report.figures import run_figure
    from sharpscope.runs import read_run
    path = _line_search_run(tmp_path, "r", 1e4, 10.0, not_descent=(5, 17, 30), spike=20)
    r = summarize_run(read_run(path), AnalysisOptions())
    fig = run_figure(r, "r", "sharpness/critical")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"  # λ_c 10..100 and 2/lr = 2000: more than a decade
    (line,) = _gids(ax, "stability-line")
    assert np.allclose(line.get_ydata(), 2 / 1e-3)
    (marks,) = _gids(ax, "not_descent")
    assert np.allclose(marks.get_xdata(), r.eta.t[[5, 17, 30]])
    assert len(_gids(ax, "smoothed")) == 1 and len(_gids(ax, "interval")) == 1 and len(_gids(ax, "raw")) == 1
    plt.close(fig)


def test_narrow_span_keeps_a_linear_axis(tmp_path):
    import matplotlib.pyplot as plt
    from sharpscope.analysis.summaries import AnalysisOptions, summarize_run
    from sharpscope.report.curves import scale_axis, trajectory
    from sharpscope.runs import read_run
    path = _line_search_run(tmp_path, "flat", 1e4, 10.0, n=20)
    r = summarize_run(read_run(path), AnalysisOptions())
    fig, ax = plt.subplots()
    scale_axis(ax, trajectory(ax, r, color="C0"))  # 10..100 without the 2/lr line: one decade
    assert ax.get_yscale() == "linear" and not _gids(ax, "not_descent")
    plt.close(fig)


def test_central_figure_of_a_measured_ladder(tmp_path):
    import matplotlib.pyplot as plt
    from sharpscope.analysis.runset import analyze_any
    from sharpscope.report.figures import trajectories
    from sharpscope.runs import read_study
    for k, n in enumerate((1e4, 3e4, 1e5)):
        _line_search_run(tmp_path / "runs", f"m{k}", n, 10.0 * (k + 1), not_descent=(10 + k,), spike=25)
    a = analyze_any(read_study(tmp_path / "runs"))
    assert a.kind == "study"
    fig = trajectories(a)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert len(_gids(ax, "stability-line")) == 3 and len(_gids(ax, "smoothed")) == 3
    assert sum(m.get_xdata().size for m in _gids(ax, "not_descent")) == 3
    labels = [t.get_text() for legend in ax.findobj(matplotlib.legend.Legend) for t in legend.get_texts()]
    assert "10K params" in " ".join(labels) and any("not_descent" in x for x in labels)
    plt.close(fig)
