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
