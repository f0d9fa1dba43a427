"""analysis/summaries.py: one run read once, and runs grouped and averaged by model."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sharpscope.analysis.summaries import AnalysisOptions, by_model, finite_mean, model_means, summarize_run
from sharpscope.runs import read_run, write_run

T = np.linspace(0, 1, 41)


def write(root, name, model, n_params, rows_extra=lambda i, t: {}, order=None):
    rows = [{"step": i, "t": float(t), "sharpness/critical": 1.0 + t, **rows_extra(i, t)} for i, t in enumerate(T)]
    rows = [rows[i] for i in order] if order is not None else rows
    write_run(root / name, {"name": name, "model": model, "n_params": n_params, "source": "measured"}, rows)
    return summarize_run(read_run(root / name), AnalysisOptions())


def test_finite_mean_skips_missing_readings():
    assert finite_mean([1.0, None, float("nan"), 3.0]) == 2.0
    assert math.isnan(finite_mean([None, float("inf")]))


def test_by_model_groups_seeds_smallest_first(tmp_path):
    runs = [write(tmp_path, "b0", "big", 1e6), write(tmp_path, "s0", "small", 1e3), write(tmp_path, "b1", "big", 1e6)]
    groups = by_model(runs)
    assert [[r.run.name for r in g] for g in groups] == [["s0"], ["b0", "b1"]]
    assert model_means(groups, lambda r: r.final).tolist() == pytest.approx([runs[1].final, runs[0].final])


def test_summary_reads_in_training_order_and_against_two_over_lr(tmp_path):
    # appended out of order (a measurement over checkpoints may be): the final window is still the end
    shuffled = write(tmp_path, "x", "x", 1e3, order=np.random.default_rng(0).permutation(T.size),
                     rows_extra=lambda i, t: {"sharpness/two_over_lr": 2.0})
    assert shuffled.final == pytest.approx(np.mean(1.0 + T[-4:]))
    # lr = 2 / two_over_lr = 1, so λ_c·lr/2 = (1 + t)/2 over t ≥ 0.1
    assert shuffled.edge_ratio == pytest.approx(np.median((1.0 + T[T >= 0.1]) / 2))


# --- critical sharpness of a line search, summarised on η_c ---------------------------------

def line_search_rows(eta, *, failed=None, lr=1e-3, extra=None):
    """Rows as the trainer writes them: η_c and λ_c = 2/η_c, or a failure with null values."""
    failed = failed or {}
    rows = []
    for i, e in enumerate(eta):
        t = i / (len(eta) - 1)
        row = {"step": i + 1, "t": t, "lr": lr, "sharpness/evals": 5.0, **(extra(i) if extra else {})}
        if i in failed:
            row.update({"sharpness/critical": None, "sharpness/eta_c": None, f"sharpness/failed/{failed[i]}": 1.0})
        else:
            row.update({"sharpness/critical": 2.0 / e, "sharpness/eta_c": e})
        rows.append(row)
    return rows


def summarize_rows(tmp_path, rows, name="ls", **opts):
    write_run(tmp_path / name, {"name": name, "n_params": 1e4, "source": "measured"}, rows)
    return summarize_run(read_run(tmp_path / name), AnalysisOptions(**opts))


def test_final_value_is_two_over_mean_eta_with_not_descent_as_zero(tmp_path):
    # 40 measurements; the last 10% (4) hold a spike (η_c near 0⁺) and one uphill update
    eta = [0.01] * 36 + [0.02, 1e-6, 0.04, None]
    r = summarize_rows(tmp_path, line_search_rows(eta, failed={39: "not_descent"}))
    assert r.eta is not None and r.eta.status[-1] == "not_descent" and r.eta.eta[-1] == 0.0
    assert r.final == pytest.approx(2.0 / ((0.02 + 1e-6 + 0.04 + 0.0) / 4))  # by hand: 2/0.01500025
    # λ-space drops the uphill update and averages the last 4 of the 39 finite λ_c, spike included
    old = summarize_rows(tmp_path, line_search_rows(eta, failed={39: "not_descent"}), name="old", eta_space=False)
    assert old.final == pytest.approx((200 + 100 + 2e6 + 50) / 4)
    assert r.failed_share == pytest.approx(1 / 40) and r.failed_reasons == {"not_descent": 1}
    # the median of the window is the median of η_c, reported as 2/η
    med = summarize_rows(tmp_path, line_search_rows(eta, failed={39: "not_descent"}), name="med",
                         final_statistic="median")
    assert med.final == pytest.approx(2.0 / np.median([0.02, 1e-6, 0.04, 0.0]))


def test_no_increase_and_other_failures_are_left_out(tmp_path):
    eta = [0.01] * 36 + [0.02, None, None, 0.04]
    r = summarize_rows(tmp_path, line_search_rows(eta, failed={37: "no_increase", 38: "max_evals"}))
    assert r.eta.status[37] == "no_increase" and np.isinf(r.eta.eta[37]) and np.isnan(r.eta.eta[38])
    assert r.measured_points == 38
    # the last 10% of the 38 used measurements: 0.01, 0.01, 0.02, 0.04
    assert r.final == pytest.approx(2.0 / np.mean([0.01, 0.01, 0.02, 0.04]))


def test_peak_is_a_held_level_not_one_spike(tmp_path):
    eta = [0.1] * 20 + [1e-5] + [0.1] * 9 + [0.01] * 5 + [0.1] * 5
    r = summarize_rows(tmp_path, line_search_rows(eta))
    assert r.peak == pytest.approx(2.0 / 0.01)  # the five-point plateau at λ = 200, not the 200,000 spike
    old = summarize_rows(tmp_path, line_search_rows(eta), name="old", eta_space=False)
    assert old.peak == pytest.approx(2e5)


def test_phase_means_edge_and_correlations_on_eta(tmp_path):
    eta = np.linspace(0.02, 0.01, 41).tolist()
    eta[30] = None
    r = summarize_rows(tmp_path, line_search_rows(eta, failed={30: "not_descent"}, lr=0.015,
                                                  extra=lambda i: {"train/loss": 3.0 - i / 40}))
    t, e = r.eta.t, r.eta.eta
    assert r.phase_means[2] == pytest.approx(2.0 / np.mean(e[t >= 0.6]))  # 0 included
    ratio = np.where(e > 0, 0.015 / np.where(e > 0, e, 1), np.inf)[t >= 0.1]
    assert r.edge_ratio == pytest.approx(np.median(ratio))
    assert r.frac_above_edge == pytest.approx(np.mean(ratio > 1))  # the uphill update is above the line
    assert r.r_loss == pytest.approx(-np.corrcoef(e, 3.0 - np.arange(41) / 40)[0, 1])
    assert r.early[0.1] == pytest.approx(2.0 / np.mean(e[t <= 0.1]))


def test_runs_without_a_line_search_keep_the_lambda_space_summary(tmp_path):
    # the simulator's rows: λ_c and η_c = 2/λ_c, no record of a search
    lam = 1.0 + T ** 2
    rows = [{"step": i, "t": float(t), "sharpness/critical": float(v), "sharpness/eta_c": 2.0 / float(v)}
            for i, (t, v) in enumerate(zip(T, lam))]
    r = summarize_rows(tmp_path, rows, name="sim")
    assert r.eta is None
    assert r.final == pytest.approx(np.mean(lam[-4:])) and r.peak == pytest.approx(lam.max())


def test_seed_average_of_line_search_runs_is_on_eta(tmp_path):
    from sharpscope.analysis.summaries import model_sharpness, sharpness_mean
    a = summarize_rows(tmp_path, line_search_rows([0.01] * 20), name="a")
    b = summarize_rows(tmp_path, line_search_rows([0.04] * 20), name="b")
    assert sharpness_mean([a, b], lambda r: r.final) == pytest.approx(2.0 / 0.025)  # not (200 + 50) / 2
    assert model_sharpness([[a, b]], lambda r: r.final).tolist() == pytest.approx([80.0])
