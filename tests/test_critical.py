"""Critical sharpness against closed forms (least squares) and a fine-grid line search."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from support.dense_reference import (
    cross_entropy_loss, least_squares_loss, least_squares_problem, tiny_transformer, token_batches,
)
from sharpscope.curvature import (
    CriticalSharpnessResult, DirectionCapture, NonFiniteLossError, SharpnessMonitor,
    critical_sharpness, relative_critical_sharpness, update_direction,
)

RTOL = 1 / 16


def _as_direction(d):
    return [d.reshape(1, -1)]


def _directions(g, seed):
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(g.shape, generator=gen, dtype=g.dtype)
    return {
        "gradient": g,
        "adam-like": g / (g.abs() + 1e-3),
        "random-descent": g + 0.5 * g.norm() * noise / noise.norm(),
    }


@pytest.mark.parametrize("method", ["fast", "paper"])
@pytest.mark.parametrize("seed", range(6))
def test_least_squares_closed_form(method, seed):
    model, batch, H, g = least_squares_problem(seed=seed)
    for name, d in _directions(g, seed).items():
        assert float(g @ d) > 0, name
        truth = float(d @ H @ d / (g @ d))
        result = critical_sharpness(model, least_squares_loss, batch, _as_direction(d), method=method)
        assert result.status == "ok", (name, result.message)
        eta_c = 2 / truth
        lo, hi = result.bracket
        assert lo <= eta_c * (1 + 1e-9) and eta_c <= hi * (1 + 1e-9), name
        assert 1 - lo / hi <= RTOL
        assert abs(result.sharpness - truth) <= RTOL * truth, name
        if method == "fast":
            # f(η) = (L(η) − L0)/η is linear for a quadratic: interpolation is exact.
            assert result.sharpness == pytest.approx(truth, rel=1e-9), name
        assert result.evals == len(result.probes) + 1
        assert result.loss0 == pytest.approx(float(least_squares_loss(model, batch).detach()))


def test_gradient_direction_is_bounded_by_lambda_max():
    model, batch, H, g = least_squares_problem()
    result = critical_sharpness(model, least_squares_loss, batch, _as_direction(g))
    assert result.sharpness <= float(torch.linalg.eigvalsh(H)[-1]) * (1 + RTOL)


@pytest.mark.parametrize("rtol", [1 / 4, 1 / 16, 1 / 64])
def test_paper_method_meets_its_tolerance(rtol):
    model, batch, H, g = least_squares_problem(seed=3)
    result = critical_sharpness(model, least_squares_loss, batch, _as_direction(g), method="paper", rtol=rtol)
    lo, hi = result.bracket
    assert 1 - lo / hi <= rtol
    assert result.eta == pytest.approx((lo + hi) / 2)


def test_warm_start_needs_fewer_evaluations():
    model, batch, H, g = least_squares_problem(seed=1)
    d = _as_direction(g / (g.abs() + 1e-3))
    cold = critical_sharpness(model, least_squares_loss, batch, d)
    warm = critical_sharpness(model, least_squares_loss, batch, d, warm_start=cold)
    assert warm.evals == 3  # baseline + one probe each side of η_c
    assert warm.sharpness == pytest.approx(cold.sharpness, rel=1e-9)
    paper = critical_sharpness(model, least_squares_loss, batch, d, method="paper", eta0=cold.eta)
    assert paper.evals > warm.evals


class _Profile:
    """L(θ − η·d) evaluated directly, parameters put back afterwards."""

    def __init__(self, model, loss_fn, batch, direction):
        self.model, self.loss_fn, self.batch, self.direction = model, loss_fn, batch, direction
        self.params = list(model.parameters())
        self.origin = [p.detach().clone() for p in self.params]

    def __call__(self, eta):
        with torch.no_grad():
            for p, o, d in zip(self.params, self.origin, self.direction):
                p.copy_(o - eta * d)
            return float(self.loss_fn(self.model, self.batch))

    def close(self):
        with torch.no_grad():
            for p, o in zip(self.params, self.origin):
                p.copy_(o)


def _fine_grid_eta_c(model, loss_fn, batch, direction, lo, hi, points=4001):
    """The first η on a fine log grid where the loss exceeds L0, refined by bisection."""
    loss_at = _Profile(model, loss_fn, batch, direction)
    try:
        base = loss_at(0.0)
        grid = np.geomspace(lo, hi, points)
        values = np.array([loss_at(float(e)) for e in grid])
        first = int(np.argmax(values > base))
        assert values[first] > base and first > 0 and values[first - 1] <= base
        a, b = float(grid[first - 1]), float(grid[first])
        for _ in range(60):
            m = 0.5 * (a + b)
            a, b = (a, m) if loss_at(m) > base else (m, b)
        return 0.5 * (a + b)
    finally:
        loss_at.close()


def _trained_adam_direction(model, batch):
    """The direction of a real Adam step after two earlier steps (moments not trivial)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        cross_entropy_loss(model, batch).backward()
        opt.step()
    opt.zero_grad()
    return update_direction(model, cross_entropy_loss, batch, opt)


@pytest.mark.parametrize("kind", ["gradient", "adam"])
@pytest.mark.parametrize("seed", [2, 5])
@pytest.mark.parametrize("method", ["fast", "paper"])
def test_transformer_agrees_with_fine_grid_line_search(method, seed, kind):
    model = tiny_transformer(seed=seed)
    model.eval()
    batch = token_batches(seed=seed, n=4)[0]
    if kind == "gradient":
        direction = update_direction(model, cross_entropy_loss, batch)
    else:
        direction = _trained_adam_direction(model, batch)
    result = critical_sharpness(model, cross_entropy_loss, batch, direction, method=method)
    assert result.status == "ok"
    # The grid starts six decades below the answer, so an earlier crossing is not missed.
    eta_c = _fine_grid_eta_c(model, cross_entropy_loss, batch, direction, result.eta * 1e-6, result.eta * 50, points=3001)
    assert abs(result.eta - eta_c) <= RTOL * eta_c
    lo, hi = result.bracket
    assert lo <= eta_c <= hi


def test_transformer_profile_is_not_quadratic():
    """The grid test above is only meaningful if the profile departs from a parabola."""
    model = tiny_transformer(seed=2)
    model.eval()
    batch = token_batches(seed=2, n=4)[0]
    direction = update_direction(model, cross_entropy_loss, batch)
    result = critical_sharpness(model, cross_entropy_loss, batch, direction)
    etas = np.array([result.eta * s for s in (0.25, 0.5, 1.0)])
    loss_at = _Profile(model, cross_entropy_loss, batch, direction)
    base, values = loss_at(0.0), np.array([loss_at(float(e)) for e in etas])
    loss_at.close()
    f = (values - base) / etas
    # for a quadratic f is linear in η: the two slopes would be equal
    s1, s2 = (f[1] - f[0]) / (etas[1] - etas[0]), (f[2] - f[1]) / (etas[2] - etas[1])
    assert abs(s1 - s2) > 0.05 * abs(s2)


def test_relative_critical_sharpness_closed_form():
    model, batch1, H1, g1 = least_squares_problem(seed=0)
    gen = torch.Generator().manual_seed(9)
    X2 = torch.randn(40, 10, generator=gen, dtype=torch.float64)
    y2 = torch.randn(40, 1, generator=gen, dtype=torch.float64)
    w = model.weight.detach().reshape(-1)
    g2 = X2.T @ X2 @ w / 40 - X2.T @ y2.reshape(-1) / 40
    if float(g1 @ g2) <= 0:  # needs a direction that descends objective 1
        y2 = -y2
        g2 = X2.T @ X2 @ w / 40 - X2.T @ y2.reshape(-1) / 40
    assert float(g1 @ g2) > 0
    truth = float(g2 @ H1 @ g2 / (g1 @ g2))
    result = relative_critical_sharpness(model, least_squares_loss, batch1, least_squares_loss, (X2, y2))
    assert result.sharpness == pytest.approx(truth, rel=1e-9)


def test_update_direction_of_sgd_and_adam_first_step():
    model, batch, H, g = least_squares_problem()
    d_grad = update_direction(model, least_squares_loss, batch)
    assert torch.allclose(d_grad[0].reshape(-1), g, rtol=1e-12)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    d_sgd = update_direction(model, least_squares_loss, batch, sgd)
    assert torch.allclose(d_sgd[0].reshape(-1), g, rtol=1e-9)
    adam = torch.optim.Adam(model.parameters(), lr=0.01, eps=1e-8)
    d_adam = update_direction(model, least_squares_loss, batch, adam)
    # first Adam step: m̂ = g, v̂ = g², so d = g / (|g| + eps)
    assert torch.allclose(d_adam[0].reshape(-1), g / (g.abs() + 1e-8), rtol=1e-7)
    assert len(adam.state) == 0  # the step was undone


def test_direction_capture_divides_every_group_by_one_reference_lr():
    # With groups at different lrs, d must stay parallel to the step actually taken, so
    # that θ − lr·d is the optimizer's own step (per-group division would bend the line).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    model(x).pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD([
        {"params": model[0].parameters(), "lr": 0.1},
        {"params": model[1].parameters(), "lr": 0.01},
    ])
    with DirectionCapture(model, opt) as capture:
        opt.step()
    assert capture.lr == 0.1
    scales = [1.0, 1.0, 0.1, 0.1]  # group 1 moved by 0.01·g = 0.1·(0.1·g)
    for d, g, s in zip(capture.direction, grads, scales):
        assert torch.allclose(d, s * g, rtol=1e-9, atol=1e-12)
    for b, p, d in zip(before, model.parameters(), capture.direction):
        assert torch.allclose(b - capture.lr * d, p.detach(), rtol=0, atol=1e-15)


def test_direction_capture_reference_lr_skips_frozen_groups():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    opt = torch.optim.SGD([
        {"params": model[0].parameters(), "lr": 0.0},  # frozen by lr = 0
        {"params": model[1].parameters(), "lr": 0.05},
    ])
    model(torch.randn(8, 3, dtype=torch.float64)).pow(2).mean().backward()
    with DirectionCapture(model, opt) as capture:
        opt.step()
    assert capture.lr == 0.05
    assert all(float(d.abs().max()) == 0.0 for d in capture.direction[:2])


class _SignMomentum(torch.optim.Optimizer):
    """A custom optimizer (sign of a momentum buffer, its own state and hyperparameters)
    written here so capture is checked against something it cannot know the formula of."""

    def __init__(self, params, lr, beta=0.9):
        super().__init__(params, {"lr": lr, "beta": beta})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("buf", torch.zeros_like(p))
                buf.mul_(group["beta"]).add_(p.grad)
                p.add_(buf.sign(), alpha=-group["lr"])


def test_direction_capture_works_with_a_custom_optimizer():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()
    opt = _SignMomentum(model.parameters(), lr=0.03)
    x = torch.randn(16, 5, dtype=torch.float64)
    expected_buf = [torch.zeros_like(p) for p in model.parameters()]
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        for b, p in zip(expected_buf, model.parameters()):
            b.mul_(0.9).add_(p.grad)
        with DirectionCapture(model, opt) as capture:
            opt.step()
        assert capture.lr == 0.03
        for d, b in zip(capture.direction, expected_buf):
            assert torch.allclose(d, b.sign(), rtol=0, atol=1e-12)


def test_direction_capture_refuses_a_group_without_lr():
    class NoLr(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"step_size": 0.1})

        def step(self):
            pass

    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match="no 'lr'.*lr=") as info:
        with DirectionCapture(model, NoLr(model.parameters())):
            pass
    assert "\n" not in str(info.value)
    with DirectionCapture(model, NoLr(model.parameters()), lr=0.1) as capture:
        pass
    assert capture.lr == 0.1


def test_direction_capture_records_nothing_when_the_step_raises():
    model, batch, _, _ = least_squares_problem()
    capture = DirectionCapture(model, lr=0.1)
    with pytest.raises(RuntimeError):
        with capture:
            raise RuntimeError("step failed")
    assert capture.direction is None


def test_direction_capture_refuses_zero_lr():
    model, _, _, _ = least_squares_problem()
    with pytest.raises(ValueError, match="lr"):
        with DirectionCapture(model, lr=0.0):
            pass
    with pytest.raises(ValueError, match="optimizer"):
        DirectionCapture(model)


def test_monitor_measures_at_the_pre_step_parameters():
    """On least squares with SGD, λ_c at θ_before along d = g(θ_before) is gᵀHg/‖g‖²."""
    model, batch, H, _ = least_squares_problem(seed=4)
    X, y = batch
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = SharpnessMonitor(model, least_squares_loss, batch, opt, every=2)
    measured = 0
    for step in range(8):
        opt.zero_grad()
        least_squares_loss(model, batch).backward()
        w = model.weight.detach().reshape(-1).clone()
        g = H @ w - X.T @ y.reshape(-1) / X.shape[0]
        with monitor.around_step(step):
            opt.step()
        if step % 2 == 0:
            truth = float(g @ H @ g / (g @ g))
            assert monitor.latest["sharpness/critical"] == pytest.approx(truth, rel=1e-8)
            assert monitor.latest["sharpness/lr_over_eta_c"] == pytest.approx(0.05 * truth / 2, rel=1e-8)
            measured += 1
        else:
            assert monitor.latest is None
    assert measured == 4 and monitor.measurements == 4


def test_monitor_state_round_trip_keeps_the_warm_start():
    model, batch, _, _ = least_squares_problem(seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = SharpnessMonitor(model, least_squares_loss, batch, opt, every=1)
    opt.zero_grad()
    least_squares_loss(model, batch).backward()
    with monitor.around_step(0):
        opt.step()
    restored = SharpnessMonitor(model, least_squares_loss, batch, opt, every=1)
    restored.load_state_dict(monitor.state_dict())
    assert restored.last.eta == monitor.last.eta and restored.last.slope == monitor.last.slope
    assert restored.measurements == 1


# ---- float32, small losses, flat profiles ------------------------------------------------
# The band that tells a decrease from rounding is relative to L0, and a probe inside it does
# not send the search towards zero. A fixed band, 16·eps·max(|L0|, 1), read every float32
# decrease below 1.9e-6 as an increase; halving from probes inside the band ends in
# "not_descent" on a profile that is flat to rounding near η = 0.

LOSS_SCALES = [1.0, 1e-2, 1e-4, 2e-5, 1e-6]


def _float32_least_squares(seed, loss0):
    """The least-squares problem in float32 with its loss scaled so L0 = ``loss0``; H and g
    in float64 from the float32 data, i.e. from what the float32 model really holds.
    λ_c = dᵀHd/gᵀd does not depend on the scale: L and L0 scale alike."""
    model, (X, y), _, _ = least_squares_problem(seed=seed)
    model, X, y = model.float(), X.float(), y.float()
    Xd, yd = X.double(), y.double().reshape(-1)
    w = model.weight.detach().double().reshape(-1)
    H = Xd.T @ Xd / Xd.shape[0]
    g = H @ w - Xd.T @ yd / Xd.shape[0]
    scale = loss0 / float(0.5 * ((Xd @ w - yd) ** 2).mean())

    def loss_fn(m, batch):
        return scale * least_squares_loss(m, batch)

    return model, loss_fn, (X, y), H, g


def _check_against_truth(result, truth, name, margin):
    """Status ok, λ_c within rtol of the truth, and the true η_c inside the bracket up to
    ``margin``: the float32 loss is the exact one plus rounding, which moves the crossing
    the probes see by (rounding of L)/(4·depth of the well) of η_c."""
    assert result.status == "ok", (name, result.status, result.loss0)
    assert abs(result.sharpness - truth) <= RTOL * truth, (name, result.sharpness, truth)
    lo, hi = result.bracket
    eta_c = 2 / truth
    assert lo <= eta_c * (1 + margin) and eta_c <= hi * (1 + margin), (name, lo, eta_c, hi)


@pytest.mark.parametrize("method", ["fast", "paper"])
@pytest.mark.parametrize("loss0", LOSS_SCALES)
def test_float32_least_squares_at_every_loss_scale(method, loss0):
    for seed in range(3):
        model, loss_fn, batch, H, g = _float32_least_squares(seed, loss0)
        for name, d in _directions(g, seed).items():
            d = d.float().double()  # the direction the float32 search really follows
            assert float(g @ d) > 0, name
            truth = float(d @ H @ d / (g @ d))
            result = critical_sharpness(model, loss_fn, batch, _as_direction(d.float()), method=method)
            assert result.loss0 == pytest.approx(loss0, rel=1e-5)
            # rounding of eps·L0 in a well of depth of order L0: about 1e-6 of η_c
            _check_against_truth(result, truth, (seed, name), margin=1e-4)
            if method == "fast":
                # Interpolating f is exact for a quadratic; float32 rounding of the losses
                # leaves about 1e-7.
                assert result.sharpness == pytest.approx(truth, rel=1e-3), (seed, name)
        # and uphill, the same band must not take rounding for a decrease
        uphill = critical_sharpness(model, loss_fn, batch, _as_direction(-g.float()), method=method)
        assert uphill.status == "not_descent", (seed, uphill.probes)


def _near_fit_least_squares(seed, residual):
    """Float32 least squares fitted to within ``residual``: predictions of order 1, residuals
    of order ``residual``, so the residuals cancel in float32 and the loss carries rounding
    far above eps·L0 (measured up to 1e-4·L0 at residual 1e-3, 1e-3·L0 at 1e-4)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(256, 10, generator=gen, dtype=torch.float64)
    X = X * torch.linspace(0.3, 3.0, 10, dtype=torch.float64)
    w_star = torch.randn(10, generator=gen, dtype=torch.float64)
    y = X @ w_star + residual * torch.randn(256, generator=gen, dtype=torch.float64)
    w = w_star + 0.3 * residual * torch.randn(10, generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(10, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w.reshape(1, -1))
    X, y = X.float(), y.float().reshape(-1, 1)
    Xd, yd = X.double(), y.double().reshape(-1)
    wd = model.weight.detach().double().reshape(-1)
    H = Xd.T @ Xd / Xd.shape[0]
    g = H @ wd - Xd.T @ yd / Xd.shape[0]
    return model, (X, y), H, g


@pytest.mark.parametrize("method", ["fast", "paper"])
@pytest.mark.parametrize("residual", [1e-3, 1e-4])
def test_float32_least_squares_near_its_minimum(method, residual):
    for seed in range(2):
        model, batch, H, g = _near_fit_least_squares(seed, residual)
        for name, d in _directions(g, seed).items():
            d = d.float().double()
            truth = float(d @ H @ d / (g @ d))
            result = critical_sharpness(model, least_squares_loss, batch, _as_direction(d.float()), method=method)
            assert result.loss0 < 1e-5
            # rounding up to 1e-3·L0 in wells 0.3–0.5·L0 deep: the crossing moves by up to
            # about 1e-3 of η_c (1.5e-4 measured)
            _check_against_truth(result, truth, (seed, name), margin=5e-3)
            uphill = critical_sharpness(model, least_squares_loss, batch, _as_direction(-d.float()), method=method)
            assert uphill.status == "not_descent", (seed, name)


def _polynomial_profile(*coefficients, scale=1.0):
    """A one-parameter float32 model whose loss along d = −1 from w = 0 is
    scale·(1 + Σ_k c_k·η^k), k = 1, 2, …: the profile is known in closed form."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()

    def loss_fn(m, batch):
        t = m.weight.reshape(())
        return scale * (1.0 + sum(c * t ** (k + 1) for k, c in enumerate(coefficients)))

    return model, loss_fn, [-torch.ones(1, 1)]


@pytest.mark.parametrize("method", ["fast", "paper"])
@pytest.mark.parametrize("scale", [1.0, 1e-6])
@pytest.mark.parametrize("eta0", [None, 1e-4])
def test_profile_flat_near_zero_then_a_well(method, scale, eta0):
    # L(η) = s·(1 − η³ + η⁴): no slope at η = 0, so short steps change the float32 loss by
    # less than its rounding (η³ < 16·eps up to η ≈ 0.012, the default η0 is 0.01), yet the
    # loss falls well below L0 further out and rises again past η_c = 1 exactly. A search
    # that reads flat probes as increases halves towards zero and reports "not_descent";
    # the right answer is λ_c = 2.
    model, loss_fn, d = _polynomial_profile(0.0, 0.0, -1.0, 1.0, scale=scale)
    result = critical_sharpness(model, loss_fn, None, d, method=method, eta0=eta0)
    assert result.status == "ok", result.probes
    lo, hi = result.bracket
    assert lo <= 1.0 <= hi * (1 + 1e-6)
    assert abs(result.sharpness - 2.0) <= RTOL * 2.0
    # and the search did probe where the float32 loss equals L0 to rounding (16·eps)
    near_zero = [loss for eta, loss in result.probes if eta < 0.012]
    assert near_zero and all(abs(loss / scale - 1) <= 16 * 2**-23 for loss in near_zero)


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_profile_flat_near_zero_then_rising_is_not_descent(method):
    # L(η) = 1 + η³ never falls below L0: flat to rounding near 0, risen beyond. The search
    # goes up from the flat probes, meets the rise, then looks below it down to the
    # parameters' rounding limit, and ends "not_descent" well within its budget.
    model, loss_fn, d = _polynomial_profile(0.0, 0.0, 1.0)
    result = critical_sharpness(model, loss_fn, None, d, method=method)
    assert result.status == "not_descent", result.probes
    assert result.evals < 64 and math.isnan(result.sharpness)


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_profile_flat_everywhere_is_no_increase(method):
    # A direction that does not change the loss at all (every probe equals L0): there is no
    # η with L > L0, so the outcome is "no_increase" at eta_max, reached going up, not
    # "not_descent" reached by halving towards zero.
    model, loss_fn, d = _polynomial_profile(0.0, scale=0.5)
    result = critical_sharpness(model, loss_fn, None, d, method=method, eta_max=1e6)
    assert result.status == "no_increase", result.probes
    assert all(loss == 0.5 for _, loss in result.probes)
    assert max(eta for eta, _ in result.probes) <= 1e6 and result.evals < 64


# ---- defined outcomes --------------------------------------------------------------------

def test_zero_direction():
    model, batch, _, g = least_squares_problem()
    result = critical_sharpness(model, least_squares_loss, batch, _as_direction(torch.zeros_like(g)))
    assert result.status == "zero_direction" and result.evals == 0
    assert math.isnan(result.sharpness) and math.isnan(result.eta)


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_ascent_direction_is_not_descent(method):
    model, batch, _, g = least_squares_problem()
    result = critical_sharpness(model, least_squares_loss, batch, _as_direction(-g), method=method)
    assert result.status == "not_descent"
    assert math.isnan(result.sharpness)
    assert result.evals < 64


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_no_increase_up_to_eta_max(method):
    model = torch.nn.Linear(3, 1, bias=False).double()
    x = torch.ones(4, 3, dtype=torch.float64)

    def decreasing(m, batch):  # linear in θ: descends forever along +gradient
        return -m(batch).mean()

    d = update_direction(model, decreasing, x)
    result = critical_sharpness(model, decreasing, x, d, method=method, eta_max=1e3)
    assert result.status == "no_increase"
    assert math.isnan(result.sharpness)
    assert result.bracket[1] == math.inf


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_non_finite_probe_counts_as_increase(method):
    model, batch, H, g = least_squares_problem()
    eta_true = 2 / float(g @ H @ g / (g @ g))
    w0 = model.weight.detach().clone()

    def loss_with_cliff(m, b):  # NaN beyond 0.8·η_c along g
        step = float((w0 - m.weight).norm() / g.norm())
        return least_squares_loss(m, b) if step < 0.8 * eta_true else torch.tensor(float("nan"))

    result = critical_sharpness(model, loss_with_cliff, batch, _as_direction(g), method=method)
    assert result.status == "ok"
    lo, hi = result.bracket
    assert lo <= 0.8 * eta_true <= hi * (1 + 1e-9)
    assert any(math.isnan(loss) for _, loss in result.probes)


def test_non_finite_baseline_raises():
    model, batch, _, g = least_squares_problem()
    with pytest.raises(NonFiniteLossError, match="finite baseline"):
        critical_sharpness(model, lambda m, b: torch.tensor(float("inf")), batch, _as_direction(g))


def test_bad_arguments_are_refused():
    model, batch, _, g = least_squares_problem()
    d = _as_direction(g)
    with pytest.raises(ValueError, match="method"):
        critical_sharpness(model, least_squares_loss, batch, d, method="golden")
    with pytest.raises(ValueError, match="rtol"):
        critical_sharpness(model, least_squares_loss, batch, d, rtol=1.5)
    with pytest.raises(ValueError, match="eta0"):
        critical_sharpness(model, least_squares_loss, batch, d, eta0=-1.0)
    with pytest.raises(ValueError, match="shape"):
        critical_sharpness(model, least_squares_loss, batch, [g])
    with pytest.raises(ValueError, match="NaN"):
        critical_sharpness(model, least_squares_loss, batch, _as_direction(g * float("nan")))
    with pytest.raises(TypeError, match="warm_start"):
        critical_sharpness(model, least_squares_loss, batch, d, warm_start=0.1)


def test_several_batches_use_the_mean_loss():
    model, batch, H, g = least_squares_problem(seed=2)
    X, y = batch
    halves = [(X[:32], y[:32]), (X[32:], y[32:])]
    whole = critical_sharpness(model, least_squares_loss, batch, _as_direction(g))
    split = critical_sharpness(model, least_squares_loss, halves, _as_direction(g))
    assert split.sharpness == pytest.approx(whole.sharpness, rel=1e-9)
    assert split.evals == whole.evals


def test_bf16_autocast_runs_the_loss_under_autocast():
    model = tiny_transformer(seed=1).float()
    batch = token_batches(seed=1, n=4)[0]
    seen = []

    def loss_fn(m, b):
        seen.append(torch.is_autocast_enabled("cpu"))
        return cross_entropy_loss(m, b)

    direction = update_direction(model, cross_entropy_loss, batch)
    full = critical_sharpness(model, cross_entropy_loss, batch, direction)
    half = critical_sharpness(model, loss_fn, batch, direction, autocast=torch.bfloat16)
    assert all(seen) and seen
    assert half.status == "ok"
    assert abs(half.sharpness - full.sharpness) <= 0.25 * full.sharpness


def test_autocast_covers_every_device_type_holding_parameters():
    from sharpscope.tensors.objective import device_types

    model = tiny_transformer(seed=1).float()
    assert device_types(model) == ["cpu"]
    assert device_types(torch.nn.Module()) == ["cpu"]  # no parameters: the host


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_spread_over_cpu_and_cuda_matches_one_device():
    # Half the model on the GPU, half on the host: every measure must give what the same
    # model gives on one device, and autocast must reach both halves.
    from sharpscope.curvature import hessian_eigenvalues, hessian_trace

    class Split(torch.nn.Module):
        def __init__(self, first, second):
            super().__init__()
            self.first, self.second = first, second

        def forward(self, x):
            h = torch.tanh(self.first(x.to(self.first.weight.device)))
            return self.second(h.to(self.second.weight.device))

    torch.manual_seed(0)
    whole = Split(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)).double()
    spread = Split(torch.nn.Linear(6, 8), torch.nn.Linear(8, 3).cuda()).double()
    spread.load_state_dict(whole.state_dict())
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))

    def loss_fn(m, b):
        out = m(b[0])
        return torch.nn.functional.cross_entropy(out, b[1].to(out.device)).to("cpu")

    d_whole = update_direction(whole, loss_fn, (x, y))
    d_spread = update_direction(spread, loss_fn, (x, y))
    for a, b in zip(d_whole, d_spread):
        assert torch.allclose(a, b.cpu(), rtol=1e-10, atol=1e-12)
    one = critical_sharpness(whole, loss_fn, (x, y), d_whole)
    two = critical_sharpness(spread, loss_fn, (x, y), d_spread)
    assert two.sharpness == pytest.approx(one.sharpness, rel=1e-9)
    lam_one = hessian_eigenvalues(whole, loss_fn, (x, y), k=2).values
    lam_two = hessian_eigenvalues(spread, loss_fn, (x, y), k=2).values
    assert np.allclose(lam_two, lam_one, rtol=1e-8)
    tr_one = hessian_trace(whole, loss_fn, (x, y), method="hutch++", samples=60, seed=3)
    tr_two = hessian_trace(spread, loss_fn, (x, y), method="hutch++", samples=60, seed=3)
    assert tr_two.estimate == pytest.approx(tr_one.estimate, rel=1e-8)

    seen = []

    def autocast_loss(m, b):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda")))
        return loss_fn(m, b)

    spread.float()
    d = update_direction(spread, loss_fn, (x.float(), y))
    critical_sharpness(spread, autocast_loss, (x.float(), y), d, autocast=torch.bfloat16)
    assert seen and all(cpu and cuda for cpu, cuda in seen)


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_probes_are_forward_passes_without_autograd(method):
    model = tiny_transformer(seed=1)
    batch = token_batches(seed=1, n=4)[0]
    direction = update_direction(model, cross_entropy_loss, batch)
    grad_modes = []

    def loss_fn(m, b):
        grad_modes.append(torch.is_grad_enabled())
        return cross_entropy_loss(m, b)

    result = critical_sharpness(model, loss_fn, batch, direction, method=method)
    assert result.status == "ok" and len(grad_modes) == result.evals
    assert not any(grad_modes)
    assert torch.is_grad_enabled()


def test_result_metrics_use_the_run_format_names():
    model, batch, _, g = least_squares_problem()
    result = critical_sharpness(model, least_squares_loss, batch, _as_direction(g))
    assert isinstance(result, CriticalSharpnessResult) and result.ok
    assert set(result.as_metrics()) == {"sharpness/critical", "sharpness/eta_c", "sharpness/evals"}
    uphill = critical_sharpness(model, least_squares_loss, batch, _as_direction(-g))
    assert uphill.status == "not_descent"
    assert uphill.as_metrics()["sharpness/failed/not_descent"] == 1.0


def test_fast_answer_never_leaves_the_verified_bracket():
    # A probe within the rounding band below L0 counts as increased while its f is still
    # <= 0; the interpolated η_c must not be extrapolated past it.
    from sharpscope.curvature.critical import _Bracket, _final_eta

    bracket = _Bracket()
    bracket.add(1.0, (-1e-6, False))
    bracket.add(1.05, (-1e-7, True))
    assert bracket.closed(1 / 16)
    eta = _final_eta(bracket, "fast")
    assert eta == 1.05  # hi is η_c to rounding: the loss there is L0 within the band
    # across a real sign change the interpolation stands (exact for a linear f)
    bracket = _Bracket()
    bracket.add(1.0, (-1.0, False))
    bracket.add(1.05, (3.0, True))
    assert _final_eta(bracket, "fast") == pytest.approx(1.0125)
