"""The uncertainty of critical sharpness: the bootstrap standard error against the real
spread over independent probes, the probe's descent rate against gᵀd, and the monitor's
probe choices (fixed, step, next, a growing probe)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from support.dense_reference import least_squares_problem
from sharpscope.curvature import SharpnessMonitor, critical_sharpness
from sharpscope.curvature.bootstrap import bootstrap_spread, replicate_etas, replicate_means
from sharpscope.curvature.monitor import check_monitor_options
from sharpscope.tensors.objective import Objective

# --------------------------------------------------------------------------- two real problems


def regression_pool(n=20000, d=12, seed=0):
    """Noisy linear regression with a spread spectrum; per-example squared error."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.linspace(0.3, 2.0, d, dtype=torch.float64)
    y = X @ torch.randn(d, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(n, generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(0.5 * torch.randn(1, d, generator=gen, dtype=torch.float64))
    return model, X, y


def regression_examples(model, batch):
    x, t = batch
    return 0.5 * (model(x).squeeze(-1) - t) ** 2


def classification_pool(n=20000, d=10, classes=4, seed=1):
    """Labels from a random teacher network (with label noise); a small MLP student."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=gen)
    teacher = torch.randn(d, classes, generator=gen)
    logits = X @ teacher + 0.8 * torch.randn(n, classes, generator=gen)
    y = logits.argmax(dim=1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, classes))
    return model, X, y


def classification_examples(model, batch):
    x, t = batch
    return F.cross_entropy(model(x), t, reduction="none")


def gradient_direction(model, loss_fn, batch):
    model.zero_grad()
    loss_fn(model, batch).mean().backward()
    out = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return out


def half_68(values):
    lo, hi = np.quantile(values, [0.15865525, 0.84134475])
    return 0.5 * (hi - lo)


@pytest.mark.parametrize("problem,n", [("regression", 32), ("regression", 256), ("classification", 64)])
def test_stderr_matches_the_spread_over_independent_probes(problem, n):
    # The real spread: λ_c on 150 independent probe batches of n examples at the same θ
    # and direction. The reported standard error of one measurement must match it within
    # a factor of 2 (the bootstrap sees only its own probe's examples).
    pool, loss_fn = ((regression_pool, regression_examples) if problem == "regression"
                     else (classification_pool, classification_examples))
    model, X, y = pool()
    direction = gradient_direction(model, loss_fn, (X[:128], y[:128]))
    gen = torch.Generator().manual_seed(7)
    values, stderrs = [], []
    for _ in range(150):
        idx = torch.randint(128, X.shape[0], (n,), generator=gen)
        r = critical_sharpness(model, loss_fn, (X[idx], y[idx]), direction)
        assert r.ok, r.message
        values.append(r.sharpness)
        stderrs.append(r.stderr)
    spread, reported = half_68(np.array(values)), float(np.median(stderrs))
    assert 0.5 < reported / spread < 2.0, (reported, spread)


def test_mean_loss_has_no_stderr_and_the_same_answer():
    model, X, y = regression_pool()
    batch = (X[:64], y[:64])
    d = gradient_direction(model, regression_examples, batch)
    per_example = critical_sharpness(model, regression_examples, batch, d)
    mean = critical_sharpness(model, lambda m, b: regression_examples(m, b).mean(), batch, d)
    assert math.isnan(mean.stderr) and math.isnan(mean.eta_stderr)
    assert "sharpness/critical_se" not in mean.as_metrics()
    assert per_example.sharpness == pytest.approx(mean.sharpness, rel=1e-12)
    assert per_example.evals == mean.evals  # the bootstrap adds no forward pass
    metrics = per_example.as_metrics()
    assert metrics["sharpness/critical_se"] == per_example.stderr > 0
    assert metrics["sharpness/eta_c_se"] == per_example.eta_stderr > 0


def test_bootstrap_leaves_random_state_alone_and_is_deterministic():
    model, X, y = regression_pool()
    batch = (X[:64], y[:64])
    d = gradient_direction(model, regression_examples, batch)
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    a = critical_sharpness(model, regression_examples, batch, d)
    b = critical_sharpness(model, regression_examples, batch, d)
    assert a.stderr == b.stderr and a.eta_stderr == b.eta_stderr
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(u, v) for u, v in zip(np.random.get_state(), np_state))


def test_replicates_of_an_exact_quadratic_are_solved_exactly():
    # L(η) − L0 = −a·η + b·η² per replicate: the crossing is a/b wherever it lies
    # relative to the probes (inside, above them, below them), and uphill (a < 0) is 0.
    etas = np.array([0.5, 1.0, 1.2, 4.0])
    a = np.array([1.0, 1.0, 1.0, 0.2, -0.3])
    b = np.array([1.0, 0.9, 0.05, 1.0, 1.0])
    changes = -a[:, None] * etas + b[:, None] * etas**2
    got = replicate_etas(etas, changes, band=1e-12)
    want = np.where(a > 0, a / b, 0.0)
    assert got[:2] == pytest.approx(want[:2], rel=1e-12)  # inside the probes
    assert got[2] == pytest.approx(min(want[2], 64 * 4.0), rel=1e-12)  # beyond: 20 = a/b
    assert got[3] == pytest.approx(want[3], rel=1e-12)  # below the smallest probe
    assert got[4] == 0.0  # uphill


def test_replicate_means_resample_within_each_batch():
    # Two strata of different sizes: every replicate's mean is the mean of the two
    # strata's resampled means, so a constant stratum contributes exactly its constant.
    baseline = [np.array([1.0, 1.0, 1.0]), np.array([0.0, 2.0])]
    probe = [np.array([2.0, 2.0, 2.0]), np.array([0.0, 2.0])]
    means = replicate_means([baseline, probe], 500, seed=3)
    assert np.allclose(means[:, 1] - means[:, 0], 0.5)  # (2 − 1)/2, whatever was drawn
    assert set(np.round(2 * means[:, 0] - 1.0, 12)) <= {0.0, 1.0, 2.0}
    bad = [np.array([1.0, np.inf, 1.0]), np.array([0.0, 2.0])]
    assert np.isinf(replicate_means([baseline, bad], 10, seed=0)[:, 1]).all()


def test_stderr_needs_a_bracket():
    spread = bootstrap_spread([1.0, 2.0], [np.ones(4)], [[np.full(4, 0.5)], [np.full(4, 2.0)]], 1e-9)
    # identical examples: every replicate is the same, so the spread is 0
    assert spread.stderr == 0.0 and spread.eta_stderr == 0.0


def test_objective_takes_means_of_per_example_losses_and_refuses_matrices():
    model, X, y = regression_pool()
    objective = Objective(model, regression_examples, [(X[:10], y[:10]), (X[10:30], y[10:30])])
    value = objective.value()
    with torch.no_grad():
        want = 0.5 * (float(regression_examples(model, (X[:10], y[:10])).mean())
                      + float(regression_examples(model, (X[10:30], y[10:30])).mean()))
    assert value == pytest.approx(want, rel=1e-12)
    assert [len(e) for e in objective.examples] == [10, 20]
    assert objective.loss(0).dim() == 0
    with pytest.raises(TypeError, match="1-D tensor of per-example losses"):
        Objective(model, lambda m, b: regression_examples(m, b)[:, None], (X[:4], y[:4])).value()


# --------------------------------------------------------------------------- the probe's descent rate


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_descent_on_the_probe_is_gtd_over_norm(sign):
    # Least squares: gᵀd/‖d‖ by the central difference (one extra evaluation) for an
    # uphill direction.
    model, batch, H, g = least_squares_problem()
    d = sign * (g / (g.abs() + 1e-3))
    r = critical_sharpness(model, lambda m, b: 0.5 * ((m(b[0]) - b[1]) ** 2).squeeze(-1), batch, [d.reshape(1, -1)])
    truth = float(g @ d) / float(d.norm())
    if sign < 0:
        # the central difference is placed where rounding moves it by at most 0.1%
        assert r.status == "not_descent"
        assert r.descent == pytest.approx(truth, rel=1e-3)
        assert r.evals == len(r.probes) + 2
        assert r.as_metrics()["sharpness/descent_probe"] < 0
    else:  # the loss fell: d descends on the probe, nothing more to say
        assert r.ok and r.evals == len(r.probes) + 1 and math.isnan(r.descent)


# --------------------------------------------------------------------------- the monitor


def _train(monitor, model, opt, batches, *, pass_batch=None):
    out = []
    for step, batch in enumerate(batches):
        opt.zero_grad()
        classification_examples(model, batch).mean().backward()
        probe = None if pass_batch is None else pass_batch(step)
        with monitor.around_step(step, batch=probe):
            opt.step()
        out.append(monitor.latest)
    return out


def test_monitor_logs_stderr_and_both_descent_rates():
    model, X, y = classification_pool()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    monitor = SharpnessMonitor(model, classification_examples, (X[:64], y[:64]), opt, every=1)
    batches = [(X[1000 + 32 * i:1032 + 32 * i], y[1000 + 32 * i:1032 + 32 * i]) for i in range(6)]
    grads = []
    for step, batch in enumerate(batches):
        opt.zero_grad()
        classification_examples(model, batch).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        with monitor.around_step(step) as capture:
            opt.step()
        m = monitor.latest
        d = capture.direction
        gtd = sum(float((g * v).sum()) for g, v in zip(grads[-1], d))
        norm = math.sqrt(sum(float((v * v).sum()) for v in d))
        assert m["sharpness/descent_step"] == pytest.approx(gtd / norm, rel=1e-5)
        assert ("sharpness/descent_probe" in m) == ("sharpness/failed/not_descent" in m)
        if "sharpness/critical" in m:
            assert 0 < m["sharpness/critical_se"] < math.inf


def test_probe_step_and_next_measure_on_the_passed_batch():
    model, X, y = classification_pool()
    batches = [(X[32 * i:32 * i + 32], y[32 * i:32 * i + 32]) for i in range(5)]
    for probe, pick in (("step", lambda s: batches[s]), ("next", lambda s: batches[s + 1])):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        m.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        monitor = SharpnessMonitor(m, classification_examples, None, opt, every=2, probe=probe)
        rows = _train(monitor, m, opt, batches[:4], pass_batch=pick)
        assert rows[1] is None and rows[0] is not None
        # SGD's direction is the step batch's gradient: descent on it by construction
        if probe == "step":
            assert rows[0]["sharpness/descent_step"] > 0 and "sharpness/failed/not_descent" not in rows[0]
        assert monitor.settings()["probe"] == probe
    monitor = SharpnessMonitor(model, classification_examples, None, torch.optim.SGD(model.parameters(), lr=0.1),
                               probe="step")
    with pytest.raises(ValueError, match="batch"):
        with monitor.around_step(0):
            pass


def test_growing_probe_stops_at_the_target():
    model, X, y = classification_pool()
    micro = [(X[5000 + 16 * i:5016 + 16 * i], y[5000 + 16 * i:5016 + 16 * i]) for i in range(16)]
    used = {}
    for target in (10.0, 1e-6):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        m.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        monitor = SharpnessMonitor(m, classification_examples, micro, opt, every=1, probe_target=target)
        rows = _train(monitor, m, opt, [(X[:32], y[:32])])
        used[target] = rows[0]["sharpness/probe_batches"]
    assert used[10.0] == 1  # any standard error meets a target of 1000%
    assert used[1e-6] == 16  # none does: every micro-batch is used


def test_probe_options_are_checked():
    with pytest.raises(ValueError, match="probe must be one of fixed, step, next"):
        check_monitor_options(probe="random")
    with pytest.raises(ValueError, match="probe_target"):
        check_monitor_options(probe_target=-0.1)
    model, X, y = classification_pool()
    with pytest.raises(ValueError, match="probe_batch is None"):
        SharpnessMonitor(model, classification_examples, None, torch.optim.SGD(model.parameters(), lr=0.1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stderr_on_cuda_equals_cpu():
    # The example losses come back to the host for the bootstrap: the same numbers (float64)
    # give the same standard error wherever the model runs.
    model, X, y = regression_pool()
    batch = (X[:64], y[:64])
    d = gradient_direction(model, regression_examples, batch)
    cpu = critical_sharpness(model, regression_examples, batch, d)
    gpu = critical_sharpness(model.cuda(), regression_examples, (batch[0].cuda(), batch[1].cuda()),
                             [t.cuda() for t in d])
    assert gpu.status == cpu.status == "ok"
    assert gpu.sharpness == pytest.approx(cpu.sharpness, rel=1e-9)
    assert gpu.stderr == pytest.approx(cpu.stderr, rel=1e-6)
