"""The edge-of-stability validation script (bench/bench_edge_of_stability.py) in
miniature: its λ_max is the dense Hessian's top eigenvalue, its λ_c is measured along the
GD step, and its thresholds and summary statistics are the ones docs/validation.md
reports. Needs scikit-learn (the digits data); skipped without it."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from support.dense_reference import dense_gradient, functional_loss

pytest.importorskip("sklearn")

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "bench_edge_of_stability.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("bench_edge_of_stability", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    # One thread, as the script runs: the tensors are tiny, and on a busy 2-core machine a
    # second thread made each backward pass up to a hundred times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        torch.set_num_threads(threads)
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def problem(script):
    # 64 points and 8 hidden units: 682 parameters, small enough for a dense Hessian.
    return script.load_problem(n_points=64, hidden=8, seed=0)


def mean_loss(script):
    # The dense reference differentiates a scalar; the script's loss_fn is per example.
    return lambda model, batch: script.loss_fn(model, batch).mean()


def dense_top(model, script, problem):
    # dense_reference's functional loss, differentiated twice with vmap over the columns
    # (fine for a tanh MLP; column by column would take most of a minute here).
    f, flat0 = functional_loss(model, mean_loss(script), [problem.batch])
    h = torch.autograd.functional.hessian(f, flat0, vectorize=True)
    return torch.linalg.eigvalsh(h)[-1].item()


def test_lambda_max_along_a_gd_run_is_the_dense_top_eigenvalue(script, problem):
    lr = 0.1
    run = script.run_gd(problem, lr, steps=20, every=10, critical_every=1)
    assert list(run.measured_steps) == [0, 10, 20]
    assert run.loss.shape == (21,) and list(run.critical_steps) == list(range(20))
    assert run.threshold == pytest.approx(2 / lr, rel=1e-15)

    # Step 0 is the initial model; step 20 is the model after the 20 updates.
    start = script.make_model(problem)
    top0 = dense_top(start, script, problem)
    assert run.measure[0] == pytest.approx(top0, rel=script.EIG_TOL)
    final = script.make_model(problem)
    opt = torch.optim.SGD(final.parameters(), lr=lr)
    for _ in range(20):
        opt.zero_grad()
        script.loss_fn(final, problem.batch).mean().backward()
        opt.step()
    top20 = dense_top(final, script, problem)
    assert run.measure[-1] == pytest.approx(top20, rel=script.EIG_TOL)
    assert run.loss[-1] == pytest.approx(script.loss_fn(final, problem.batch).mean().item(), rel=1e-12)

    # λ_c at step 0 is measured along the gradient: the loss along θ0 − η·g (dense
    # gradient) falls below L0 just under η_c = 2/λ_c and is above it just over η_c (the
    # search's rtol is 1/16). gᵀHg/‖g‖² is no check here: the profile is far from
    # quadratic at η_c ≈ 0.5 (it would give 4.5 against the true 3.8).
    f, flat0 = functional_loss(start, mean_loss(script), [problem.batch])
    g = dense_gradient(start, mean_loss(script), [problem.batch])
    eta_c = 2 / run.critical[0]
    with torch.no_grad():
        assert f(flat0 - eta_c * (1 - 1 / 16) * g) < f(flat0) < f(flat0 - eta_c * (1 + 1 / 16) * g)
    assert run.critical_failed == 0


def test_adam_threshold_is_38_over_lr_and_matches_the_library(script, problem):
    assert script.adam_threshold(1e-3, 0.9) == pytest.approx(38_000, rel=1e-12)
    # run_adam asserts that the library's threshold is the script's at every measurement.
    run = script.run_adam(problem, 1e-3, steps=3, every=1, raw_every=2)
    assert list(run.measured_steps) == [1, 2]
    assert run.threshold == pytest.approx(38 / 1e-3, rel=1e-12)
    assert np.isnan(run.raw_lambda_max[0]) and run.raw_lambda_max[1] > 0


def test_summary_statistics_on_a_hand_made_run(script):
    # 2/η = 20; λ_max reaches 0.9·20 = 18 at step 20; after it the ratios are 0.925, 1.0, 1.05.
    loss = np.array([1.0, 0.9, 0.8, 0.85, 0.7, 0.75, 0.6])
    run = script.Run("gd", 0.1, script.gd_threshold(0.1), loss, np.array([0, 2, 4, 5, 6]),
                     np.array([5.0, 10.0, 18.5, 20.0, 21.0]), critical_steps=np.arange(6),
                     critical=np.array([0.1, 0.2, 21.0, 19.0, 22.0, 20.5]), critical_se=np.full(6, 0.1))
    s = script.summarize(run)
    assert s["threshold"] == 20.0 and s["reach"] == 4
    assert s["median"] == pytest.approx(1.0) and s["n"] == 3
    assert s["c_reach"] == 2 and s["c_median"] == pytest.approx((20.5 / 20 + 21 / 20) / 2)
    # Loss rose on steps 2 and 4; λ_c > 20 on steps 2, 4, 5: five of six agree.
    assert s["agree"] == pytest.approx(5 / 6)
    assert s["rises_before"] == pytest.approx(1 / 4) and s["rises_after"] == pytest.approx(1 / 2)
    assert "| 0.1 | 20.0 | 6 |" in script.table([s])


def test_missing_scikit_learn_is_one_line(script, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    assert script.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "scikit-learn is not installed" in out[0]


def test_table_is_rewritten_between_the_markers_only(script, tmp_path):
    doc = tmp_path / "validation.md"
    doc.write_text(f"intro\n{script.TABLE_BEGIN}\nold\n{script.TABLE_END}\nafter\n")
    assert script.update_doc(doc, "new table")
    assert doc.read_text() == f"intro\n{script.TABLE_BEGIN}\nnew table\n{script.TABLE_END}\nafter\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not script.update_doc(plain, "x") and plain.read_text() == "no markers\n"
    assert math.isnan(script.after_stats(np.arange(3), np.zeros(3), None)[0])
