"""The report: figures and the self-contained HTML, on the simulated study and a scales-only one."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser

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
