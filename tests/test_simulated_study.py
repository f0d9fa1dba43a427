"""analysis/study.py on the simulated study and on hand-built runs in the shared format."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from sharpscope.analysis.study import AnalysisOptions, analyze_runs
from sharpscope.errors import UserError
from sharpscope.report.build import write_report
from sharpscope.runs import read_study, write_run
from sharpscope.simulation import SimulationConfig, write_study

SCALES = ["10M", "125M", "350M", "1.3B", "3B", "7B"]

REQUIRED_COLUMNS = {
    "scales": {"model", "n_params", "peak_sharpness", "final_sharpness", "final_loss", "mean_accuracy"},
    "phases": {"model", "phase1", "phase2", "phase3"},
    "downstream": {"model", "n_params", "mean_accuracy", "hellaswag", "arc_easy", "piqa", "winogrande", "lambada"},
    "pac_bayes": {"model", "n_params", "final_sharpness", "bound", "delta", "m", "source_bound"},
    "measures": {"measure", "slope", "intercept", "r2"},
    "schedules": {"model", "schedule", "peak_sharpness", "final_sharpness", "three_phase"},
    "extrapolation": {"model", "n_params", "predicted", "lower", "upper", "observed"},
    "ablations": {"model", "factor", "level", "three_phase"},
    "correlations": {"model", "r_sharpness_loss", "r_sharpness_grad_norm"},
    "early_prediction": {"horizon", "r2", "loo_r2"},
}
ROW_COUNTS = {"scales": 6, "phases": 6, "downstream": 6, "pac_bayes": 6, "measures": 3, "schedules": 15,
              "extrapolation": 3, "ablations": 54, "correlations": 6, "early_prediction": 2}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    study = root / "runs"
    write_study(SimulationConfig(), study)
    result = write_report(study, root / "report", figures=False)
    return study, result


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- tables -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(REQUIRED_COLUMNS))
def test_table_written_with_required_columns(sim, name):
    _, result = sim
    path = result.out / "tables" / f"{name}.csv"
    assert path.is_file()
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = set(reader.fieldnames or [])
        rows = list(reader)
    missing = REQUIRED_COLUMNS[name] - header
    assert not missing, f"{name}.csv lacks {sorted(missing)}"
    assert len(rows) == ROW_COUNTS[name]
    assert (result.out / "tables" / f"{name}.md").is_file()


def test_summary_json_written(sim):
    _, result = sim
    summary = json.loads((result.out / "summary.json").read_text())
    assert summary["n_runs"] == 78
    assert summary["sources"] == ["simulated"]
    assert summary["scaling_law"]["n"] == 6
    assert summary["scaling_law"]["slope"] == pytest.approx(result.analysis.summary["scaling_law"]["slope"], rel=1e-12)


def test_scales_table_order_and_labels(sim):
    _, result = sim
    rows = result.analysis.tables["scales"]
    assert [r["model"] for r in rows] == SCALES
    assert all(r["n_runs"] == 1 for r in rows)
    assert [r["n_params"] for r in rows] == sorted(r["n_params"] for r in rows)


# --- source-agnostic --------------------------------------------------------------------

def _assert_same(a, b, where="") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, (bool, np.bool_)) or a is None or isinstance(a, str):
        assert a == b, f"{where}: {a!r} vs {b!r}"
    elif isinstance(a, (int, float, np.integer, np.floating)):
        a, b = float(a), float(b)
        assert (math.isnan(a) and math.isnan(b)) or a == b, f"{where}: {a!r} vs {b!r}"
    else:
        assert a == b, where


def test_source_agnostic(sim, tmp_path):
    study, result = sim
    measured = tmp_path / "measured"
    shutil.copytree(study, measured)
    n = 0
    for cfg_path in measured.rglob("config.json"):
        config = json.loads(cfg_path.read_text())
        assert "shape" in config and "simulation" in config
        config["source"] = "measured"
        del config["shape"], config["simulation"]
        cfg_path.write_text(json.dumps(config))
        n += 1
    assert n == 78
    other = analyze_runs(read_study(measured))
    _assert_same(result.analysis.tables, other.tables, "tables")
    s1 = dict(result.analysis.summary)
    s2 = dict(other.summary)
    assert s1.pop("sources") == ["simulated"]
    assert s2.pop("sources") == ["measured"]
    _assert_same(s1, s2, "summary")


# --- independent recomputation from the raw files ---------------------------------------

def _raw_scale_runs(study: Path) -> dict[str, tuple[float, np.ndarray, np.ndarray]]:
    out = {}
    for label in SCALES:
        run = study / "scales" / label
        config = json.loads((run / "config.json").read_text())
        rows = _read_jsonl(run / "metrics.jsonl")
        t = np.array([r["t"] for r in rows if "sharpness/critical" in r], dtype=float)
        s = np.array([r["sharpness/critical"] for r in rows if "sharpness/critical" in r], dtype=float)
        out[label] = (float(config["n_params"]), t, s)
    return out


def test_independent_final_sharpness_and_slope(sim):
    study, result = sim
    raw = _raw_scale_runs(study)
    rows = {r["model"]: r for r in result.analysis.tables["scales"]}
    n_params, finals = [], []
    for label, (n, t, s) in raw.items():
        assert s.size == 200
        final = float(np.mean(s[-20:]))
        assert rows[label]["final_sharpness"] == pytest.approx(final, rel=1e-12)
        assert rows[label]["peak_sharpness"] == pytest.approx(float(np.max(s)), rel=1e-12)
        n_params.append(n)
        finals.append(final)
    slope, intercept = np.polyfit(np.log10(n_params), finals, 1)
    law = result.analysis.summary["scaling_law"]
    assert law["slope"] == pytest.approx(slope, rel=1e-9)
    assert law["intercept"] == pytest.approx(intercept, rel=1e-9)
    r = np.corrcoef(np.log10(n_params), finals)[0, 1]
    assert law["r"] == pytest.approx(r, rel=1e-9)
    assert law["r2"] == pytest.approx(r * r, rel=1e-9)


def test_independent_phase_means(sim):
    study, result = sim
    raw = _raw_scale_runs(study)
    rows = {r["model"]: r for r in result.analysis.tables["phases"]}
    for label, (_, t, s) in raw.items():
        expected = (s[t < 0.2].mean(), s[(t >= 0.2) & (t < 0.6)].mean(), s[t >= 0.6].mean())
        got = (rows[label]["phase1"], rows[label]["phase2"], rows[label]["phase3"])
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_independent_final_loss_and_accuracy(sim):
    study, result = sim
    rows = {r["model"]: r for r in result.analysis.tables["scales"]}
    for label in SCALES:
        metrics = _read_jsonl(study / "scales" / label / "metrics.jsonl")
        loss = np.array([r["train/loss"] for r in metrics])
        assert rows[label]["final_loss"] == pytest.approx(float(loss[-20:].mean()), rel=1e-12)
        accs = {k: v for r in metrics for k, v in r.items() if k.startswith("eval/acc/")}
        assert len(accs) == 5
        assert rows[label]["mean_accuracy"] == pytest.approx(float(np.mean(list(accs.values()))), rel=1e-12)


# --- hand-built runs --------------------------------------------------------------------

def _curve(t: np.ndarray, peak: float, final: float, t_peak: float, decay: float) -> np.ndarray:
    return np.where(t < t_peak, final + (peak - final) * t / t_peak,
                    final + (peak - final) * np.exp(-decay * (t - t_peak)))


def _write_hand_run(path: Path, model: str, n: float, seed: int, *, metric: str = "sharpness/critical",
                    group: str | None = "scales") -> float:
    """A simple three-phase run plus noise; returns its final value (mean of the last 10%)."""
    rng = np.random.default_rng([seed, int(n) % 100003])
    t = np.linspace(0.0, 1.0, 100)
    x = math.log10(n) - 7
    s = _curve(t, 2.0 + 0.3 * x, 1.2 - 0.1 * x, 0.15, 4.0) + 0.02 * rng.standard_normal(t.size)
    loss = 3.0 + 5.0 * np.exp(-5 * t) + 0.01 * rng.standard_normal(t.size)
    rows = [{"step": 10 * i, "t": float(t[i]), metric: float(s[i]), "train/loss": float(loss[i])}
            for i in range(t.size)]
    config = {"name": f"{model}-seed{seed}", "model": model, "n_params": n, "source": "measured", "seed": seed}
    if group is not None:
        config["group"] = group
    write_run(path, config, rows)
    return float(np.mean(s[-10:]))


def test_multiple_seeds_are_averaged(tmp_path):
    finals: dict[str, list[float]] = {}
    for label, n in (("20M", 2e7), ("200M", 2e8), ("2B", 2e9)):
        for seed in (0, 1):
            finals.setdefault(label, []).append(_write_hand_run(tmp_path / f"{label}-s{seed}", label, n, seed))
    a = analyze_runs(read_study(tmp_path))
    rows = a.tables["scales"]
    assert [r["model"] for r in rows] == ["20M", "200M", "2B"]
    for r in rows:
        assert r["n_runs"] == 2
        assert "final_sharpness_std" in r and "peak_sharpness_std" in r
        f = finals[r["model"]]
        assert f[0] != f[1]
        assert r["final_sharpness"] == pytest.approx(np.mean(f), rel=1e-12)
        assert r["final_sharpness_std"] == pytest.approx(np.std(f, ddof=1), rel=1e-9)
    assert a.summary["scaling_law"]["n"] == 3
    assert a.summary["n_runs"] == 6
    assert a.summary["sources"] == ["measured"]
    assert a.summary["three_phase_scales"] == "6/6"
    assert {row["n_runs"] for row in a.tables["early_prediction"]} == {6}  # seeds kept apart


def test_runs_without_group_count_as_scales(tmp_path):
    for label, n in (("20M", 2e7), ("200M", 2e8), ("2B", 2e9)):
        _write_hand_run(tmp_path / label, label, n, 0, group=None)
    a = analyze_runs(read_study(tmp_path))
    assert [r["model"] for r in a.tables["scales"]] == ["20M", "200M", "2B"]
    assert a.tables["schedules"] == [] and a.tables["ablations"] == []


def test_fewer_than_three_model_sizes(tmp_path):
    for label, n in (("20M", 2e7), ("2B", 2e9)):
        for seed in (0, 1):  # four runs, but only two sizes
            _write_hand_run(tmp_path / f"{label}-s{seed}", label, n, seed)
    with pytest.raises(UserError, match="at least 3"):
        analyze_runs(read_study(tmp_path))


def test_run_without_metric_mentions_flag(tmp_path):
    _write_hand_run(tmp_path / "a", "20M", 2e7, 0)
    _write_hand_run(tmp_path / "b", "200M", 2e8, 0)
    _write_hand_run(tmp_path / "c", "2B", 2e9, 0, metric="sharpness/other")
    with pytest.raises(UserError, match="--metric") as exc:
        analyze_runs(read_study(tmp_path))
    assert "sharpness/critical" in str(exc.value)


def test_other_metric_option(tmp_path, sim):
    study, _ = sim
    with pytest.raises(UserError, match="--metric"):
        analyze_runs(read_study(study / "scales"), AnalysisOptions(metric="sharpness/nope"))
    for label, n in (("20M", 2e7), ("200M", 2e8), ("2B", 2e9)):
        _write_hand_run(tmp_path / label, label, n, 0, metric="sharpness/other")
    a = analyze_runs(read_study(tmp_path), AnalysisOptions(metric="sharpness/other"))
    assert a.summary["metric"] == "sharpness/other"
    assert len(a.tables["scales"]) == 3


# --- schedules and ablations summary ----------------------------------------------------

def test_schedules_summary(sim):
    _, result = sim
    preserved = result.analysis.summary["schedules_preserved"]
    assert len(preserved) == 15
    for model in ("10M", "1.3B", "7B"):
        assert preserved[f"{model}/cosine"] is True
        assert preserved[f"{model}/linear"] is True
    rows = result.analysis.tables["schedules"]
    assert {(r["model"], r["schedule"]) for r in rows} == {
        (m, s) for m in ("10M", "1.3B", "7B") for s in ("cosine", "linear", "constant", "wsd", "cosine_restarts")}
    for r in rows:
        assert preserved[f"{r['model']}/{r['schedule']}"] == r["three_phase"]


def test_ablation_count_reported(sim):
    _, result = sim
    text = result.analysis.summary["ablations_preserved"]
    m = re.fullmatch(r"(\d+)/54", text)
    assert m, text
    kept = sum(bool(r["three_phase"]) for r in result.analysis.tables["ablations"])
    assert int(m.group(1)) == kept
    by_factor = result.analysis.summary["ablations_by_factor"]
    assert set(by_factor) == {"decay_multiplier", "peak_offset", "noise_sigma"}
    assert sum(int(v.split("/")[0]) for v in by_factor.values()) == kept
    assert all(v.endswith("/18") for v in by_factor.values())
