"""The simulated study (SPEC section 5): fidelity to the published table, the closed-form
equations without noise, determinism, the study's layout, and its import/config hygiene."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sharpscope.config import load_config
from sharpscope.errors import UserError
from sharpscope.report.build import write_report
from sharpscope.simulation import SimulationConfig, plan_study, simulate_run, write_study
from sharpscope.sizes import parse_size

# model: peak S, final S, final loss, mean accuracy (SPEC section 5, Table "scales")
PUBLISHED = {
    "10M": (2.0644, 1.2785, 5.009, 0.3616),
    "125M": (2.4108, 1.1669, 4.1508, 0.4532),
    "350M": (2.5996, 1.1217, 3.8431, 0.4843),
    "1.3B": (2.7585, 1.0646, 3.4863, 0.5344),
    "3B": (2.8945, 1.0135, 3.2753, 0.5674),
    "7B": (2.9976, 0.9804, 3.077, 0.603),
}
SCALES = list(PUBLISHED)
TOL = {"peak": 0.03, "final": 0.01, "loss": 0.005, "accuracy": 0.02}
TAIL = 20  # last 10% of 200 checkpoints


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def assert_fidelity(label: str, peak: float, final: float, loss: float, acc: float) -> None:
    p_peak, p_final, p_loss, p_acc = PUBLISHED[label]
    assert rel(peak, p_peak) <= TOL["peak"], f"{label}: peak {peak:.4f} vs published {p_peak}"
    assert rel(final, p_final) <= TOL["final"], f"{label}: final {final:.4f} vs published {p_final}"
    assert rel(loss, p_loss) <= TOL["loss"], f"{label}: final loss {loss:.4f} vs published {p_loss}"
    assert rel(acc, p_acc) <= TOL["accuracy"], f"{label}: mean accuracy {acc:.4f} vs published {p_acc}"


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The default study (seed 42) written to disk and analysed (tables only)."""
    root = tmp_path_factory.mktemp("simstudy")
    study = root / "study"
    paths = write_study(SimulationConfig(), study)
    result = write_report(study, root / "report", figures=False)
    return study, paths, result


@pytest.fixture(scope="module")
def planned():
    return plan_study(SimulationConfig())


def _scale_runs(plan):
    return {p.config["model"]: p.run for p in plan if p.config["group"] == "scales"}


# --- fidelity with seed 42 --------------------------------------------------------------

@pytest.mark.parametrize("label", SCALES)
def test_fidelity_through_written_study(written, label):
    _, _, result = written
    rows = {row["model"]: row for row in result.analysis.tables["scales"]}
    assert list(rows) == SCALES
    row = rows[label]
    assert row["n_params"] == parse_size(label)
    assert_fidelity(label, row["peak_sharpness"], row["final_sharpness"], row["final_loss"], row["mean_accuracy"])


def test_fidelity_through_written_csv(written):
    """The CSV written by the report carries the same numbers as the in-memory table."""
    _, _, result = written
    with open(result.out / "tables" / "scales.csv", newline="") as fh:
        rows = {r["model"]: r for r in csv.DictReader(fh)}
    assert list(rows) == SCALES
    for label in SCALES:
        r = rows[label]
        assert_fidelity(label, float(r["peak_sharpness"]), float(r["final_sharpness"]),
                        float(r["final_loss"]), float(r["mean_accuracy"]))


@pytest.mark.parametrize("label", SCALES)
def test_fidelity_through_plan_study(planned, label):
    run = _scale_runs(planned)[label]
    assert run.sharpness.size == 200
    peak = float(np.max(run.sharpness))
    final = float(np.mean(run.sharpness[-TAIL:]))
    loss = float(np.mean(run.loss[-TAIL:]))
    acc = float(np.mean(list(run.accuracy.values())))
    assert len(run.accuracy) == 5
    assert_fidelity(label, peak, final, loss, acc)


def test_plan_and_written_agree(planned, written):
    _, _, result = written
    rows = {row["model"]: row for row in result.analysis.tables["scales"]}
    for label, run in _scale_runs(planned).items():
        assert rows[label]["final_sharpness"] == pytest.approx(float(np.mean(run.sharpness[-TAIL:])), rel=1e-12)
        assert rows[label]["peak_sharpness"] == pytest.approx(float(np.max(run.sharpness)), rel=1e-12)


# --- noise-free: the closed-form equations ----------------------------------------------

def _noise_free_config() -> SimulationConfig:
    return load_config(SimulationConfig, overrides=["noise_sigma=0", "oscillation.amplitude=0", "loss.noise_sigma=0"])


def test_noise_free_overrides_apply():
    cfg = _noise_free_config()
    assert cfg.noise_sigma == 0.0 and cfg.oscillation.amplitude == 0.0 and cfg.loss.noise_sigma == 0.0
    assert SimulationConfig().noise_sigma > 0  # the default is noisy, so the override did something


@pytest.mark.parametrize("label", SCALES + ["13B"])
def test_noise_free_sharpness_matches_equations(label):
    cfg = _noise_free_config()
    n = parse_size(label)
    run = simulate_run(cfg, n, np.random.default_rng(123))
    t = np.linspace(0.0, 1.0, 200)
    x = math.log10(n) - 7.0
    s_p, s_f = 2.0 + 0.35 * x, 1.2 - 0.12 * x
    t_p, lam = 0.15 - 0.005 * x, 3.0 + 0.2 * x
    expected = np.where(t < t_p, s_f + (s_p - s_f) * t / t_p, s_f + (s_p - s_f) * np.exp(-lam * (t - t_p)))
    np.testing.assert_allclose(run.t, t, rtol=0, atol=0)
    np.testing.assert_allclose(run.sharpness, expected, rtol=1e-12, atol=1e-12)
    # the rise starts at the plateau level (not at the peak, as the source misprints it)
    assert run.sharpness[0] == pytest.approx(s_f, abs=1e-12)
    assert np.max(run.sharpness) <= s_p + 1e-12


@pytest.mark.parametrize("label", SCALES)
def test_noise_free_loss_matches_equation(label):
    cfg = _noise_free_config()
    n = parse_size(label)
    run = simulate_run(cfg, n, np.random.default_rng(7))
    t = np.linspace(0.0, 1.0, 200)
    l_f = 3.5 * (n / 1e9) ** -0.076
    np.testing.assert_allclose(run.loss, l_f + (10.0 - l_f) * np.exp(-5.0 * t), rtol=1e-12, atol=1e-12)


def test_noise_free_written_runs_match_equations(tmp_path):
    """Through the run format too: what plan_study records for the scale runs is the equation."""
    cfg = _noise_free_config()
    plan = plan_study(cfg)
    t = np.linspace(0.0, 1.0, 200)
    for p in plan:
        if p.config["group"] != "scales":
            continue
        x = math.log10(p.config["n_params"]) - 7.0
        s_p, s_f = 2.0 + 0.35 * x, 1.2 - 0.12 * x
        t_p, lam = 0.15 - 0.005 * x, 3.0 + 0.2 * x
        expected = np.where(t < t_p, s_f + (s_p - s_f) * t / t_p, s_f + (s_p - s_f) * np.exp(-lam * (t - t_p)))
        got = np.array([row["sharpness/critical"] for row in p.rows()])
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
        assert p.config["shape"]["peak"] == pytest.approx(s_p)
        assert p.config["shape"]["final"] == pytest.approx(s_f)
        assert p.config["shape"]["t_peak"] == pytest.approx(t_p)
        assert p.config["shape"]["decay"] == pytest.approx(lam)


# --- determinism ------------------------------------------------------------------------

FIELDS = ("sharpness", "loss", "grad_norm", "lambda_max", "trace_per_param", "lr", "tokens")


def _assert_same_runs(a, b):
    assert [p.relpath for p in a] == [p.relpath for p in b]
    for pa, pb in zip(a, b):
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(pa.run, f), getattr(pb.run, f), err_msg=f"{pa.relpath} {f}")
        assert pa.run.accuracy == pb.run.accuracy


def test_same_seed_identical(planned):
    _assert_same_runs(planned, plan_study(SimulationConfig()))


def test_different_seed_differs(planned):
    other = plan_study(SimulationConfig(seed=43))
    assert [p.relpath for p in other] == [p.relpath for p in planned]
    for pa, pb in zip(planned, other):
        # loss and gradient norm are noisy in every run (the noise_sigma=0 ablation has a
        # noise-free sharpness, so sharpness is compared where it carries noise)
        assert not np.array_equal(pa.run.loss, pb.run.loss), pa.relpath
        assert not np.array_equal(pa.run.grad_norm, pb.run.grad_norm), pa.relpath
        if pa.config["group"] == "scales":
            assert not np.array_equal(pa.run.sharpness, pb.run.sharpness), pa.relpath


def test_scale_runs_independent_of_other_groups(planned):
    cfg = SimulationConfig()
    cfg.schedule_study.scales = ["125M"]
    cfg.schedule_study.schedules = ["constant", "wsd"]
    cfg.ablations.scales = ["350M"]
    cfg.ablations.decay_multipliers = [0.5]
    cfg.ablations.peak_offsets = [0.1]
    cfg.ablations.noise_sigmas = [0.2, 0.3]
    cfg.extrapolation_scales = ["20B"]
    changed = plan_study(cfg)
    assert len(changed) != len(planned)  # the other groups really changed
    base, new = _scale_runs(planned), _scale_runs(changed)
    assert list(base) == list(new) == SCALES
    for label in SCALES:
        for f in FIELDS:
            np.testing.assert_array_equal(getattr(base[label], f), getattr(new[label], f), err_msg=f"{label} {f}")
        assert base[label].accuracy == new[label].accuracy


def test_scale_runs_draw_only_from_seed_stream(planned):
    """The six scale runs are default_rng(seed) consumed in order, nothing else."""
    cfg = SimulationConfig()
    rng = np.random.default_rng(cfg.seed)
    base = _scale_runs(planned)
    for label in SCALES:
        run = simulate_run(cfg, parse_size(label), rng)
        np.testing.assert_array_equal(run.sharpness, base[label].sharpness)
        np.testing.assert_array_equal(run.loss, base[label].loss)
        assert run.accuracy == base[label].accuracy


# --- layout of the written study --------------------------------------------------------

def test_study_layout_and_configs(written):
    study, paths, _ = written
    assert len(paths) == 6 + 15 + 54 + 3
    counts: dict[str, int] = {}
    for path in paths:
        path = Path(path)
        group = path.relative_to(study).parts[0]
        counts[group] = counts.get(group, 0) + 1
        config = json.loads((path / "config.json").read_text())
        assert config["n_params"] > 0
        assert config["source"] == "simulated"
        assert config["group"] == group
        lines = (path / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 200
    assert counts == {"scales": 6, "schedules": 15, "ablations": 54, "extrapolation": 3}


def test_study_group_members(written):
    study, _, _ = written
    assert sorted(p.name for p in (study / "scales").iterdir()) == sorted(SCALES)
    assert sorted(p.name for p in (study / "extrapolation").iterdir()) == ["13B", "30B", "70B"]
    schedules = {p.name for p in (study / "schedules").iterdir()}
    assert schedules == {f"{m}-{s}" for m in ("10M", "1.3B", "7B")
                         for s in ("cosine", "linear", "constant", "wsd", "cosine_restarts")}
    factors = [json.loads((p / "config.json").read_text())["ablation"]["factor"] for p in (study / "ablations").iterdir()]
    assert {f: factors.count(f) for f in set(factors)} == {"decay_multiplier": 18, "peak_offset": 18, "noise_sigma": 18}


# --- hygiene ----------------------------------------------------------------------------

def test_simulation_and_analysis_do_not_import_torch():
    code = ("import sys, sharpscope.simulation, sharpscope.analysis, sharpscope.report.build; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_unknown_config_key_is_user_error():
    with pytest.raises(UserError, match="nope"):
        load_config(SimulationConfig, overrides=["nope=1"])


def test_unknown_nested_config_key_is_user_error():
    with pytest.raises(UserError, match="oscillation.nope"):
        load_config(SimulationConfig, overrides=["oscillation.nope=1"])


def test_fewer_than_three_scales_is_user_error():
    with pytest.raises(UserError, match="3 scales"):
        plan_study(SimulationConfig(scales=["10M", "1.3B"]))
    cfg = load_config(SimulationConfig, overrides=["scales=10M,7B"])
    assert cfg.scales == ["10M", "7B"]
    with pytest.raises(UserError):
        plan_study(cfg)


def test_write_study_refuses_bad_config_before_writing(tmp_path):
    with pytest.raises(UserError):
        write_study(SimulationConfig(scales=["10M"]), tmp_path / "study")
    assert not (tmp_path / "study").exists()
