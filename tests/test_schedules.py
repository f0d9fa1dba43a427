"""Tests for sharpscope.schedules (learning-rate multipliers as pure functions of the step)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from sharpscope.errors import UserError
from sharpscope.schedules import SCHEDULES, lr_multiplier

PROPS = settings(max_examples=50, deadline=None)

TOTAL, WARMUP, M = 1000, 50, 0.1


def f(name, step, **kw):
    kw.setdefault("warmup_steps", WARMUP)
    kw.setdefault("min_ratio", M)
    return lr_multiplier(name, step, TOTAL, **kw)


def test_five_schedules():
    assert set(SCHEDULES) == {"cosine", "linear", "constant", "wsd", "cosine_restarts"}


@pytest.mark.parametrize("name", SCHEDULES)
def test_warmup_values(name):
    steps = np.arange(WARMUP)
    np.testing.assert_allclose(f(name, steps), (steps + 1) / (WARMUP + 1), rtol=1e-12)
    assert f(name, 0) == pytest.approx(1 / 51)
    assert f(name, 0) > 0
    assert f(name, WARMUP - 1) == pytest.approx(50 / 51)


@pytest.mark.parametrize("name", SCHEDULES)
def test_one_right_after_warmup(name):
    assert f(name, WARMUP) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
def test_no_warmup_starts_at_one(name):
    assert lr_multiplier(name, 0, TOTAL, warmup_steps=0) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd"])
def test_end_value_is_min_ratio(name):
    for m in (0.0, 0.1, 0.5):
        assert f(name, TOTAL, min_ratio=m) == pytest.approx(m, abs=1e-12)
        assert f(name, TOTAL + 500, min_ratio=m) == pytest.approx(m, abs=1e-12)  # stays there


def test_constant_is_one_everywhere_after_warmup():
    np.testing.assert_array_equal(f("constant", np.arange(WARMUP, TOTAL + 10)), 1.0)


def test_cosine_formula():
    s = np.arange(WARMUP, TOTAL + 1)
    u = (s - WARMUP) / (TOTAL - WARMUP)
    np.testing.assert_allclose(f("cosine", s), M + (1 - M) * (1 + np.cos(np.pi * u)) / 2, rtol=1e-12)
    assert f("cosine", (WARMUP + TOTAL) / 2) == pytest.approx((1 + M) / 2)


def test_linear_formula():
    s = np.arange(WARMUP, TOTAL + 1)
    u = (s - WARMUP) / (TOTAL - WARMUP)
    np.testing.assert_allclose(f("linear", s), M + (1 - M) * (1 - u), rtol=1e-12)
    assert f("linear", (WARMUP + TOTAL) / 2) == pytest.approx((1 + M) / 2)


@pytest.mark.parametrize("decay", [None, 100, 400])
def test_wsd_constant_until_decay_then_linear(decay):
    d = 0.2 * TOTAL if decay is None else decay
    start = TOTAL - d
    stable = np.arange(WARMUP, int(start) + 1)
    np.testing.assert_array_equal(f("wsd", stable, decay_steps=decay), 1.0)
    assert f("wsd", start + 1, decay_steps=decay) < 1.0
    assert f("wsd", start + d / 2, decay_steps=decay) == pytest.approx((1 + M) / 2)
    s = np.arange(int(start), TOTAL + 1)
    np.testing.assert_allclose(f("wsd", s, decay_steps=decay), 1 - (1 - M) * (s - start) / d, rtol=1e-12)
    assert f("wsd", TOTAL, decay_steps=decay) == pytest.approx(M)


def test_cosine_restarts_cycles():
    cycle = 100
    s = np.arange(WARMUP, TOTAL)
    pos = ((s - WARMUP) % cycle) / cycle
    np.testing.assert_allclose(f("cosine_restarts", s, cycle_steps=cycle),
                               M + (1 - M) * (1 + np.cos(np.pi * pos)) / 2, rtol=1e-12)
    for k in range(1, 9):  # restarts at 1 at the start of each cycle
        assert f("cosine_restarts", WARMUP + k * cycle, cycle_steps=cycle) == pytest.approx(1.0)
        assert f("cosine_restarts", WARMUP + k * cycle - 1, cycle_steps=cycle) < M + 0.001
    # default cycle is a quarter of the post-warm-up span
    default = f("cosine_restarts", np.arange(TOTAL))
    np.testing.assert_allclose(default, f("cosine_restarts", np.arange(TOTAL), cycle_steps=(TOTAL - WARMUP) / 4))


@pytest.mark.parametrize("total, cycle, m", [(100, 25, 0.1), (90, 7, 0.0), (60, 60, 0.3), (50, 1, 0.2)])
def test_cosine_restarts_matches_torch(total, cycle, m):
    import torch  # a hard dependency of sharpscope
    lr0 = 0.5
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr0)
    sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=cycle, T_mult=1, eta_min=m * lr0)
    ours = lr_multiplier("cosine_restarts", np.arange(total), total, warmup_steps=0, min_ratio=m,
                         cycle_steps=cycle)
    theirs = []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"] / lr0)
        opt.step()
        sched.step()
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", SCHEDULES)
def test_arrays_and_scalars_agree(name):
    steps = np.arange(0, TOTAL + 20, 7)
    arr = f(name, steps, decay_steps=300, cycle_steps=120)
    assert isinstance(arr, np.ndarray) and arr.shape == steps.shape
    scal = [f(name, int(s), decay_steps=300, cycle_steps=120) for s in steps]
    assert all(type(v) is float for v in scal)
    np.testing.assert_array_equal(arr, scal)
    assert type(f(name, np.int64(3))) is float
    assert type(f(name, 3.0)) is float
    lst = f(name, [0, 60, 700])
    np.testing.assert_array_equal(lst, [f(name, 0), f(name, 60), f(name, 700)])


@PROPS
@given(st.sampled_from(SCHEDULES), st.integers(1, 5000), st.integers(0, 500), st.floats(0.0, 0.99),
       st.data())
def test_bounds_and_monotonicity(name, total, warmup, m, data):
    warmup = min(warmup, total - 1)
    steps = np.arange(total + 1)
    v = lr_multiplier(name, steps, total, warmup_steps=warmup, min_ratio=m)
    assert np.all(np.isfinite(v))
    assert np.all(v <= 1 + 1e-12)
    assert np.all(v[:warmup] > 0)
    assert np.all(np.diff(v[:warmup]) > 0)  # warm-up strictly rises ...
    post = v[warmup:]
    assert np.all(post >= m - 1e-12)
    wsd_decay_starts_in_warmup = name == "wsd" and total - 0.2 * total < warmup
    if not wsd_decay_starts_in_warmup:
        assert v[warmup] == pytest.approx(1.0)  # ... to 1
    if name in ("cosine", "linear", "wsd", "constant"):
        assert np.all(np.diff(post) <= 1e-12)   # never increases after warm-up
    s = data.draw(st.integers(0, total + 10))
    assert lr_multiplier(name, s, total, warmup_steps=warmup, min_ratio=m) == pytest.approx(
        float(lr_multiplier(name, np.array([s]), total, warmup_steps=warmup, min_ratio=m)[0]), abs=0)


@pytest.mark.parametrize("name", ["Cosine", "exp", "", "cosine-restarts"])
def test_unknown_name_is_user_error(name):
    with pytest.raises(UserError, match="unknown schedule"):
        lr_multiplier(name, 0, 100)


@pytest.mark.parametrize("total", [0, -5])
def test_non_positive_total_is_user_error(total):
    with pytest.raises(UserError, match="total_steps"):
        lr_multiplier("cosine", 0, total)


@pytest.mark.parametrize("cycle", [0, -10])
def test_non_positive_cycle_is_user_error(cycle):
    with pytest.raises(UserError, match="cycle_steps"):
        lr_multiplier("cosine_restarts", 0, 100, cycle_steps=cycle)


def test_pure_function_of_step():
    a = lr_multiplier("cosine", 321, 1000, warmup_steps=10)
    lr_multiplier("cosine", np.arange(1000), 1000, warmup_steps=10)
    assert lr_multiplier("cosine", 321, 1000, warmup_steps=10) == a
    assert not math.isnan(a)
