"""The command line, in process (sharpscope.cli.main) and once as ``python -m sharpscope``."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support.cli_helpers import run_err, run_ok
from sharpscope.runs import write_run
from sharpscope.simulation import SimulationConfig, write_study

PUBLISHED = [("10M", 1e7, 1.2785), ("125M", 1.25e8, 1.1669), ("350M", 3.5e8, 1.1217),
             ("1.3B", 1.3e9, 1.0646), ("3B", 3e9, 1.0135), ("7B", 7e9, 0.9804)]


def _csv(path: Path, rows, header="model,n_params,final_sharpness") -> Path:
    path.write_text(header + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def published_csv(tmp_path_factory) -> Path:
    return _csv(tmp_path_factory.mktemp("fit") / "published.csv", PUBLISHED)


@pytest.fixture(scope="module")
def sim_study(tmp_path_factory) -> Path:
    """The simulated study (runs only), written once; tests copy what they modify."""
    study = tmp_path_factory.mktemp("cli") / "study"
    write_study(SimulationConfig(), study)
    return study


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- fit --------------------------------------------------------------------------------

def test_fit_published_numbers(capsys, published_csv):
    out = run_ok(capsys, ["fit", published_csv, "--x", "n_params", "--y", "final_sharpness"])
    for text in ("-0.1055", "2.0196", "R² 0.9983", "AIC -61.86", "AIC -54.92", "mean 0.50%"):
        assert text in out, f"{text!r} not in:\n{out}"
    assert "preferred by AIC: log-linear" in out


def test_fit_json(capsys, published_csv):
    out = run_ok(capsys, ["fit", published_csv, "--x", "n_params", "--y", "final_sharpness", "--json"])
    data = json.loads(out)
    fit = data["fit"]
    assert fit["slope"] == pytest.approx(-0.1055, abs=5e-5)
    assert fit["intercept"] == pytest.approx(2.0196, abs=5e-5)
    assert fit["r2"] == pytest.approx(0.9983, abs=5e-5)
    assert fit["aic_loglinear"] == pytest.approx(-61.86, abs=5e-3)
    assert fit["aic_power"] == pytest.approx(-54.92, abs=5e-3)
    assert fit["n"] == 6
    assert data["predictions"] == []


def test_fit_predict(capsys, published_csv):
    base = ["fit", published_csv, "--x", "n_params", "--y", "final_sharpness"]
    fit = json.loads(run_ok(capsys, base + ["--json"]))["fit"]
    out = run_ok(capsys, base + ["--predict", "13e9,30e9,70e9"])
    lines = [ln for ln in out.splitlines() if ln.strip().startswith("N = ")]
    assert len(lines) == 3, out
    for line, n in zip(lines, (13e9, 30e9, 70e9)):
        expected = fit["slope"] * math.log10(n) + fit["intercept"]
        predicted = float(line.split(":")[1].split("[")[0])
        assert predicted == pytest.approx(expected, abs=6e-5)
        lower, upper = (float(v) for v in line.split("[")[1].split("]")[0].split(","))
        assert lower < predicted < upper
    data = json.loads(run_ok(capsys, base + ["--predict", "13e9,30e9,70e9", "--json"]))
    assert [p["n_params"] for p in data["predictions"]] == [13e9, 30e9, 70e9]


def test_fit_with_size_labels(capsys, published_csv):
    by_number = run_ok(capsys, ["fit", published_csv, "--x", "n_params", "--y", "final_sharpness",
                                "--predict", "13B,30B,70B"])
    by_label = run_ok(capsys, ["fit", published_csv, "--x", "model", "--y", "final_sharpness",
                               "--predict", "13e9,30e9,70e9"])
    # identical except the first line, which names the --x column
    assert "against model" in by_label.splitlines()[0]
    assert by_number.splitlines()[1:] == by_label.splitlines()[1:]
    j1 = json.loads(run_ok(capsys, ["fit", published_csv, "--x", "n_params", "--y", "final_sharpness", "--json"]))
    j2 = json.loads(run_ok(capsys, ["fit", published_csv, "--x", "model", "--y", "final_sharpness", "--json"]))
    assert j1 == j2


# --- fit: bad input ---------------------------------------------------------------------

def test_fit_too_few_rows(capsys, tmp_path):
    path = _csv(tmp_path / "two.csv", PUBLISHED[:2])
    line = run_err(capsys, ["fit", path, "--x", "n_params", "--y", "final_sharpness"])
    assert "3" in line


def test_fit_missing_column(capsys, published_csv):
    line = run_err(capsys, ["fit", published_csv, "--x", "n_params", "--y", "critical_sharpness"])
    assert "critical_sharpness" in line


@pytest.mark.parametrize("bad", ["0", "-10000000", "0M"])
def test_fit_non_positive_size(capsys, tmp_path, bad):
    rows = [list(r) for r in PUBLISHED]
    rows[2][1] = bad
    path = _csv(tmp_path / "bad.csv", rows)
    line = run_err(capsys, ["fit", path, "--x", "n_params", "--y", "final_sharpness"])
    assert str(path) in line and ":4:" in line  # header is line 1, third data row is line 4


@pytest.mark.parametrize("col", [1, 2])
def test_fit_nan_value(capsys, tmp_path, col):
    rows = [list(r) for r in PUBLISHED]
    rows[3][col] = "nan"
    path = _csv(tmp_path / "nan.csv", rows)
    line = run_err(capsys, ["fit", path, "--x", "n_params", "--y", "final_sharpness"])
    assert ":5:" in line


def test_fit_missing_file(capsys, tmp_path):
    missing = tmp_path / "nope.csv"
    line = run_err(capsys, ["fit", missing, "--x", "n_params", "--y", "final_sharpness"])
    assert "nope.csv" in line


# --- analyze / simulate: bad input ------------------------------------------------------

def _corrupt(metrics: Path, lineno: int) -> None:
    lines = metrics.read_text().splitlines(keepends=True)
    lines[lineno - 1] = '{"step": 35, "t": 0.17, "sharpness/critical": 1.2,\n'
    metrics.write_text("".join(lines))


def test_analyze_malformed_line(capsys, sim_study, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(sim_study / "scales", study / "scales")
    metrics = study / "scales" / "350M" / "metrics.jsonl"
    _corrupt(metrics, 7)
    line = run_err(capsys, ["analyze", study, "--out", tmp_path / "report", "--no-figures"])
    assert str(metrics) in line
    assert ":7:" in line


@pytest.mark.parametrize("field, value", [("sharpness/critical", '"abc"'), ("t", '"early"'), ("step", '"five"')])
def test_analyze_non_numeric_value(capsys, sim_study, tmp_path, field, value):
    study = tmp_path / "study"
    shutil.copytree(sim_study / "scales", study / "scales")
    metrics = study / "scales" / "3B" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    row = json.loads(lines[10])
    row[field] = "PLACEHOLDER"
    lines[10] = json.dumps(row).replace('"PLACEHOLDER"', value) + "\n"
    metrics.write_text("".join(lines))
    line = run_err(capsys, ["analyze", study, "--out", tmp_path / "report", "--no-figures"])
    assert f"{metrics}:11:" in line
    assert field in line


def test_fit_not_utf8(capsys, tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"model,n_params,final_sharpness\n10M\xff,1e7,1.2\n")
    line = run_err(capsys, ["fit", path, "--x", "n_params", "--y", "final_sharpness"])
    assert "UTF-8" in line


def test_simulate_force_replaces_all_runs(capsys, tmp_path):
    out = tmp_path / "sim"
    run_ok(capsys, ["simulate", "--out", out, "--no-analyze"])
    assert (out / "scales" / "7B").is_dir()
    run_ok(capsys, ["simulate", "--out", out, "--force", "--no-figures", "scales=10M,125M,350M",
                    "schedule_study.scales=10M", "ablations.scales=10M", "extrapolation_scales=1B"])
    assert not (out / "scales" / "7B").exists()
    assert sorted(p.name for p in (out / "scales").iterdir()) == ["10M", "125M", "350M"]
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["scaling_law"]["n"] == 3


def test_demo_out_is_a_file(capsys, tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    line = run_err(capsys, ["demo", "--out", target])
    assert "not a directory" in line
    assert target.read_text() == "keep me"


def test_analyze_no_runs(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    line = run_err(capsys, ["analyze", tmp_path / "empty", "--out", tmp_path / "report", "--no-figures"])
    assert "no runs" in line
    assert not (tmp_path / "report").exists()


def test_analyze_missing_directory(capsys, tmp_path):
    line = run_err(capsys, ["analyze", tmp_path / "absent", "--out", tmp_path / "report"])
    assert "absent" in line


def test_simulate_unknown_override(capsys, tmp_path):
    line = run_err(capsys, ["simulate", "--out", tmp_path / "sim", "--no-figures", "nope=1"])
    assert "nope" in line
    assert not (tmp_path / "sim").exists()


def test_simulate_refuses_existing_runs(capsys, tmp_path):
    out = tmp_path / "sim"
    write_run(out / "scales" / "10M", {"name": "10M", "n_params": 1e7, "source": "measured"},
              [{"step": 0, "t": 0.0, "sharpness/critical": 1.0}])
    before = _snapshot(out)
    line = run_err(capsys, ["simulate", "--out", out, "--no-figures"])
    assert "--force" in line
    assert _snapshot(out) == before


def test_analyze_does_not_half_write(capsys, sim_study, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(sim_study, study)
    report = tmp_path / "report"
    run_ok(capsys, ["analyze", study, "--out", report, "--no-figures"])
    assert (report / "summary.json").is_file() and (report / "tables" / "scales.csv").is_file()
    before = _snapshot(report)
    # a line inside the final 10% of a scale run: skipping it instead of failing would change
    # scales.csv and summary.json
    _corrupt(study / "scales" / "7B" / "metrics.jsonl", 195)
    run_err(capsys, ["analyze", study, "--out", report, "--no-figures"])
    after = _snapshot(report)
    assert after["summary.json"] == before["summary.json"]
    assert after["tables/scales.csv"] == before["tables/scales.csv"]
    assert after == before


# --- end to end -------------------------------------------------------------------------

def test_simulate_writes_runs_and_report(capsys, tmp_path):
    out = tmp_path / "sim"
    text = run_ok(capsys, ["simulate", "--out", out, "--no-figures"])
    assert "simulated 78 runs" in text
    assert len(list(out.rglob("config.json"))) == 78
    assert (out / "scales" / "7B" / "metrics.jsonl").is_file()
    assert (out / "report" / "tables" / "scales.csv").is_file()
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["n_runs"] == 78
    assert f"{summary['scaling_law']['slope']:.4f}" in text
    assert not (out / "report" / "report.html").exists()
    assert not (out / "report" / "figures").exists()


def test_simulate_seed_flag(capsys, tmp_path):
    out = tmp_path / "sim"
    run_ok(capsys, ["simulate", "--out", out, "--seed", "7", "--no-analyze"])
    config = json.loads((out / "scales" / "10M" / "config.json").read_text())
    assert config["seed"] == 7
    assert not (out / "report").exists()


# The demo's reduced study, cut further so the test stays short (the real settings are
# exercised by make demo).
QUICK_DEMO = ["--no-progress", "budget.min_steps=24", "monitor_points=8", "exact_points=2", "eval_points=2",
              "train.model.block_size=32", "train.data.batch_size=8", "train.data.max_bytes=100000",
              "train.eval.batches=1", "train.eval.arithmetic_problems=3", "train.monitor.probe_batch_size=8",
              "train.monitor.lanczos_iters=4", "train.monitor.trace_samples=2",
              "mix.steps=24", "mix.mix.validate_steps=3", "mix.mix.batch_size=8", "mix.mix.probe_batch_size=8",
              "mix.mix.eval_batches=1", "nexus.steps=24", "nexus.finetune_steps=3", "nexus.segment_points=3"]


def test_demo_writes_html(capsys, tmp_path):
    out = tmp_path / "demo"
    text = run_ok(capsys, ["demo", "--out", out, *QUICK_DEMO])
    html = out / "report" / "report.html"
    assert html.is_file()
    assert str(html) in text
    page = html.read_text()
    assert page.lstrip().startswith("<!DOCTYPE html>")
    # the simulated study and its own report
    assert (out / "simulated" / "report" / "report.html").is_file()
    assert len(list((out / "simulated").rglob("metrics.jsonl"))) == 78
    # the measured study: 5 sizes + 4 schedules at 3 sizes, each a run with checkpoints
    runs = sorted((out / "study" / "runs").iterdir())
    assert len(runs) == 17
    assert all(list((r / "checkpoints").glob("step*")) for r in runs)
    # one report: the comparison with the simulation, the mix advisor, the Nexus diagnostics
    comparison = json.loads((out / "report" / "comparison.json").read_text())
    assert {row["claim"] for row in comparison} >= {"three_phase", "loglinear_law", "schedule_pattern"}
    for anchor in ("comparison", "mix", "nexus", "grid"):
        assert f"id='{anchor}'" in page
    assert "claims hold" in text


def test_demo_bad_override_keeps_the_old_demo(capsys, tmp_path):
    out = tmp_path / "demo"
    (out / "simulated").mkdir(parents=True)
    (out / "simulated" / "keep.txt").write_text("old")
    line = run_err(capsys, ["demo", "--out", out, "sizes=[1]"])
    assert line.startswith("sharpscope: error:")
    assert (out / "simulated" / "keep.txt").read_text() == "old"


def test_module_help():
    proc = subprocess.run([sys.executable, "-m", "sharpscope", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("simulate", "train", "measure", "analyze", "fit", "demo"):
        assert command in proc.stdout
