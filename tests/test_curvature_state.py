"""The state rule of sharpscope.curvature, checked call by call.

"After any curvature call returns OR raises, the model's parameters, buffers, .grad,
optimizer state, train/eval mode of every module, requires_grad flags and the global RNG
states (torch CPU, numpy, python random) are bit-identical to before."

Every comparison below is by bytes (dtype, shape and raw bytes of each tensor), by object
identity for the parameters and for ``.grad`` tensors that existed before the call, and by
value for flags and the non-tensor optimizer entries. The models are real (tiny MLPs,
an MLP with BatchNorm1d, an MLP with an unused parameter, one with a frozen parameter and
a one-layer GPT with dropout) and so are the optimizers.
"""

from __future__ import annotations

import copy
import json
import math
import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sharpscope.curvature import (
    CriticalSharpnessResult,
    DirectionCapture,
    GGNOperator,
    HessianOperator,
    NonFiniteLossError,
    SharpnessMonitor,
    critical_sharpness,
    ggn_vector_product,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
    preconditioned_sharpness,
    relative_critical_sharpness,
    sharpness_gradient_decomposition,
    update_direction,
)
from sharpscope.training.model import GPT, GPTConfig


# --------------------------------------------------------------------------------------
# Snapshot of everything the rule covers
# --------------------------------------------------------------------------------------


def tensor_key(t: torch.Tensor) -> tuple:
    """(dtype, shape, raw bytes): equal iff the tensors are bit-identical (any dtype)."""
    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    return (str(t.dtype), tuple(t.shape), raw)


def freeze(value: Any) -> Any:
    """Optimizer state_dict as plain comparable data: tensors become their bytes."""
    if isinstance(value, torch.Tensor):
        return ("tensor",) + tensor_key(value)
    if isinstance(value, dict):
        return {k: freeze(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(freeze(v) for v in value)
    return value


def rng_states() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": tensor_key(torch.get_rng_state()),
        "numpy": (np_state[0], np_state[1].tobytes(), *np_state[2:]),
        "python": random.getstate(),
    }


@dataclass
class Snapshot:
    data: dict  # comparable across runs (values only)
    params: list = field(default_factory=list)  # Parameter objects (identity)
    grads: list = field(default_factory=list)  # .grad objects or None (identity)
    pointers: list = field(default_factory=list)  # data_ptr of every parameter


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Snapshot:
    named = list(model.named_parameters())
    data = {
        "params": [(n, tensor_key(p)) for n, p in named],
        "requires_grad": [(n, p.requires_grad) for n, p in named],
        "buffers": [(n, tensor_key(b)) for n, b in model.named_buffers()],
        "grads": [(n, None if p.grad is None else tensor_key(p.grad)) for n, p in named],
        "modes": [(n, m.training) for n, m in model.named_modules()],
        "rng": rng_states(),
        "grad_enabled": torch.is_grad_enabled(),
        "autocast_cpu": torch.is_autocast_enabled("cpu"),
    }
    if optimizer is not None:
        data["optimizer"] = freeze(optimizer.state_dict())
        data["optimizer_state_len"] = len(optimizer.state)
    return Snapshot(
        data=data,
        params=[p for _, p in named],
        grads=[p.grad for _, p in named],
        pointers=[p.data_ptr() for _, p in named],
    )


def assert_same_values(before: Snapshot, after: Snapshot) -> None:
    """Bit-identical values (parameters, buffers, grads, modes, RNG, optimizer)."""
    assert before.data.keys() == after.data.keys()
    for key in before.data:
        assert after.data[key] == before.data[key], f"{key} changed"


def assert_unchanged(before: Snapshot, after: Snapshot) -> None:
    """Values bit-identical, and the very same parameter and .grad tensor objects."""
    assert_same_values(before, after)
    assert all(a is b for a, b in zip(after.params, before.params)), "a parameter was replaced"
    assert after.pointers == before.pointers, "a parameter's storage was replaced"
    for i, (g0, g1) in enumerate(zip(before.grads, after.grads)):
        if g0 is None:
            assert g1 is None, f"parameter {i} gained a .grad"
        else:
            assert g1 is g0, f"parameter {i}'s .grad tensor object was replaced"


@contextmanager
def state_unchanged(model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
    before = snapshot(model, optimizer)
    yield before
    assert_unchanged(before, snapshot(model, optimizer))


class Boom(Exception):
    """Raised by test loss functions; deliberately not a RuntimeError."""


# --------------------------------------------------------------------------------------
# Models and batches
# --------------------------------------------------------------------------------------


class UnusedParamMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.unused = nn.Parameter(torch.randn(5))  # never touched by forward: grad None
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def logits_of(model, batch):
    return model(batch[0])


def ce_loss(model, batch):
    logits = model(batch[0])
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))


GPT_CFG = dict(vocab_size=32, block_size=16, n_layer=1, n_head=2, d_model=16)


def gpt_batch(gen: torch.Generator, B: int = 4, T: int = 8):
    tokens = torch.randint(0, GPT_CFG["vocab_size"], (B, T + 1), generator=gen)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


@dataclass
class Case:
    kind: str
    model: nn.Module
    batch: Any
    batch2: Any
    loss_fn: Callable = ce_loss
    forward_fn: Callable = logits_of


KINDS = ["mlp", "bn_mlp", "unused", "frozen", "gpt"]


def make_case(kind: str) -> Case:
    """A tiny model in *mixed* mode: train overall, one harmless leaf in eval, so that a
    guard that restores with model.train()/eval() instead of per module is caught."""
    gen = torch.Generator().manual_seed(7)
    if kind == "gpt":
        model = GPT(GPTConfig(**GPT_CFG, dropout=0.1))
        model.train()
        model.ln_out.eval()
        return Case(kind, model, gpt_batch(gen), gpt_batch(gen))
    if kind == "bn_mlp":
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    elif kind == "unused":
        model = UnusedParamMLP()
    else:
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    model = model.double()
    if kind == "frozen":
        model[0].bias.requires_grad_(False)
    model.train()
    (model.fc2 if kind == "unused" else model[-1]).eval()

    def batch():
        return torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)

    return Case(kind, model, batch(), batch())


def give_grads(case: Case, grads: str) -> None:
    """grads="existing": .grad set by a real backward; "none": every .grad is None."""
    case.model.zero_grad(set_to_none=True)
    if grads == "existing":
        case.loss_fn(case.model, case.batch).backward()


def twin(model, optimizer=None):
    """A deep copy of (model, optimizer) that shares nothing, .grad tensors included
    (Parameter.__deepcopy__ drops them)."""
    model_c, opt_c = copy.deepcopy((model, optimizer))
    for p, q in zip(model.parameters(), model_c.parameters()):
        q.grad = None if p.grad is None else p.grad.detach().clone()
    return model_c, opt_c


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def random_vector(model, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in trainable(model)]


def train_steps(case: Case, optimizer, steps: int) -> None:
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        case.loss_fn(case.model, case.batch).backward()
        optimizer.step()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin contention on busy CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def global_rng():
    """Non-trivial global RNG states (numpy with a cached Gaussian) for every test."""
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)
    np.random.standard_normal()  # leaves has_gauss=1 with a cached value
    random.random()
    torch.rand(1)


@pytest.fixture(params=KINDS)
def case(request) -> Case:
    return make_case(request.param)


@pytest.fixture(params=["none", "existing"])
def grads(request) -> str:
    return request.param


# --------------------------------------------------------------------------------------
# The snapshot helper itself
# --------------------------------------------------------------------------------------


def test_snapshot_detects_each_kind_of_change():
    case = make_case("bn_mlp")
    give_grads(case, "existing")
    model = case.model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train_steps(case, opt, 1)
    base = snapshot(model, opt)

    def changed(mutate) -> bool:
        c = twin(model, opt)
        assert_same_values(base, snapshot(*c))  # the copy starts out equal
        mutate(*c)
        try:
            assert_same_values(base, snapshot(*c))
        except AssertionError:
            return True
        return False

    # Each mutation is seen (the copy differs from the original in exactly that respect).
    assert changed(lambda m, o: m[0].weight.data.view(-1)[0:1].add_(1e-12))
    assert changed(lambda m, o: m[1].running_mean.add_(1.0))
    assert changed(lambda m, o: m[0].weight.grad.mul_(2))
    assert changed(lambda m, o: setattr(m[0].weight, "grad", None))
    assert changed(lambda m, o: m[1].eval())
    assert changed(lambda m, o: m[0].bias.requires_grad_(False))
    assert changed(lambda m, o: o.state[next(iter(o.state))]["exp_avg"].add_(1.0))
    assert changed(lambda m, o: o.state[next(iter(o.state))]["step"].add_(1.0))
    assert not changed(lambda m, o: None)
    # RNG draws are seen too.
    before = snapshot(model)
    torch.rand(1)
    with pytest.raises(AssertionError, match="rng"):
        assert_same_values(before, snapshot(model))
    before = snapshot(model)
    np.random.rand()
    with pytest.raises(AssertionError, match="rng"):
        assert_same_values(before, snapshot(model))
    before = snapshot(model)
    random.random()
    with pytest.raises(AssertionError, match="rng"):
        assert_same_values(before, snapshot(model))
    # A .grad replaced by an equal tensor is caught by identity.
    before = snapshot(model)
    model[0].weight.grad = model[0].weight.grad.clone()
    with pytest.raises(AssertionError, match="object was replaced"):
        assert_unchanged(before, snapshot(model))


# --------------------------------------------------------------------------------------
# critical_sharpness
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("method", ["fast", "paper"])
def test_critical_sharpness_along_gradient_leaves_state_bit_identical(case, grads, method, mode):
    give_grads(case, grads)
    direction = update_direction(case.model, case.loss_fn, case.batch, mode=mode)
    with state_unchanged(case.model):
        result = critical_sharpness(
            case.model, case.loss_fn, case.batch, direction, method=method, mode=mode
        )
    assert result.status == "ok", result
    assert math.isfinite(result.sharpness) and result.sharpness > 0
    assert result.evals == len(result.probes) + 1


def test_critical_sharpness_mode_none_keeps_train_mode_batchnorm_stats(grads):
    case = make_case("bn_mlp")
    give_grads(case, grads)
    direction = update_direction(case.model, case.loss_fn, case.batch, mode=None)
    # mode=None measures in the model's own (train) mode: BatchNorm updates its running
    # statistics on every probe, and the guard must undo that.
    with state_unchanged(case.model):
        result = critical_sharpness(case.model, case.loss_fn, case.batch, direction, mode=None)
    assert result.status == "ok"


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_critical_sharpness_on_two_batches_leaves_state_bit_identical(method, grads):
    case = make_case("gpt")
    give_grads(case, grads)
    batches = [case.batch, case.batch2]
    direction = update_direction(case.model, case.loss_fn, batches, mode="train")
    with state_unchanged(case.model):
        result = critical_sharpness(
            case.model, case.loss_fn, batches, direction, method=method, mode="train"
        )
    assert result.status == "ok"


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_critical_sharpness_under_bf16_autocast_leaves_state_bit_identical(method):
    case = make_case("gpt")
    give_grads(case, "existing")
    direction = update_direction(case.model, case.loss_fn, case.batch)
    with state_unchanged(case.model):
        result = critical_sharpness(
            case.model, case.loss_fn, case.batch, direction, method=method,
            autocast=torch.bfloat16,
        )
    assert isinstance(result, CriticalSharpnessResult)
    assert math.isfinite(result.loss0)


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_critical_sharpness_zero_direction_is_an_outcome_and_touches_nothing(case, method):
    give_grads(case, "existing")
    zero = [torch.zeros_like(p) for p in trainable(case.model)]
    with state_unchanged(case.model):
        result = critical_sharpness(case.model, case.loss_fn, case.batch, zero, method=method)
    assert result.status == "zero_direction"
    assert result.evals == 0 and math.isnan(result.sharpness)


@pytest.mark.parametrize("kind", ["mlp", "bn_mlp", "gpt"])
@pytest.mark.parametrize("method", ["fast", "paper"])
def test_critical_sharpness_ascent_direction_reports_not_descent(kind, method):
    case = make_case(kind)
    give_grads(case, "existing")
    g = update_direction(case.model, case.loss_fn, case.batch)
    ascent = [-t for t in g]
    with state_unchanged(case.model):
        result = critical_sharpness(case.model, case.loss_fn, case.batch, ascent, method=method)
    assert result.status == "not_descent", result.probes
    assert math.isnan(result.sharpness)


def neg_mean_loss(model, batch):
    return -model(batch[0]).mean()


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_critical_sharpness_linear_unbounded_loss_reports_no_increase(method, grads):
    # L(θ) = -mean(Wx + b) is linear in θ: along its gradient it decreases for every η.
    model = nn.Linear(4, 3).double()
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batch = (x,)
    model.zero_grad(set_to_none=True)
    if grads == "existing":
        neg_mean_loss(model, batch).backward()
    direction = update_direction(model, neg_mean_loss, batch)
    with state_unchanged(model):
        result = critical_sharpness(model, neg_mean_loss, batch, direction, method=method)
    assert result.status == "no_increase"
    assert math.isnan(result.sharpness)
    assert all(loss < result.loss0 for _, loss in result.probes)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_critical_sharpness_non_finite_direction_raises_value_error(case, bad):
    give_grads(case, "existing")
    direction = [torch.ones_like(p) for p in trainable(case.model)]
    direction[-1].view(-1)[0] = bad
    with state_unchanged(case.model):
        with pytest.raises(ValueError, match="NaN or infinite"):
            critical_sharpness(case.model, case.loss_fn, case.batch, direction)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("method", ["fast", "paper"])
def test_critical_sharpness_non_finite_baseline_raises_and_restores(method, bad, grads):
    case = make_case("bn_mlp")
    give_grads(case, grads)
    direction = update_direction(case.model, case.loss_fn, case.batch, mode=None)
    flag = {"bad": False}

    def loss_fn(model, batch):
        loss = ce_loss(model, batch)  # BatchNorm stats move in train mode
        return loss * bad if flag["bad"] else loss

    flag["bad"] = True
    with state_unchanged(case.model):
        with pytest.raises(NonFiniteLossError, match="finite baseline"):
            critical_sharpness(case.model, loss_fn, case.batch, direction, method=method, mode=None)
    assert issubclass(NonFiniteLossError, ValueError)


@pytest.mark.parametrize("kind", ["bn_mlp", "gpt", "unused"])
@pytest.mark.parametrize("method", ["fast", "paper"])
def test_critical_sharpness_loss_fn_raising_on_third_call_propagates_and_restores(kind, method, grads):
    case = make_case(kind)
    give_grads(case, grads)
    direction = update_direction(case.model, case.loss_fn, case.batch, mode="train")
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = ce_loss(model, batch)  # the forward runs (BN stats, dropout RNG) first
        if calls["n"] == 3:
            raise Boom("third call")
        return loss

    with state_unchanged(case.model):
        with pytest.raises(Boom, match="third call"):
            critical_sharpness(case.model, loss_fn, case.batch, direction, method=method, mode="train")
    # The third call is the second probe: parameters were displaced when it raised.
    assert calls["n"] == 3


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_critical_sharpness_nan_probe_counts_as_increase_and_restores(method, grads):
    # Unbounded linear loss that turns NaN once any parameter leaves [-thr, thr]: the NaN
    # region is the only "increase", so the search must bracket the NaN boundary.
    model = nn.Linear(4, 3).double()
    batch = (torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)),)
    thr = 3.0 * max(float(p.detach().abs().max()) for p in model.parameters())

    def loss_fn(model, batch):
        loss = -model(batch[0]).mean()
        if any(bool((p.abs() > thr).any()) for p in model.parameters()):
            return loss * math.nan
        return loss

    model.zero_grad(set_to_none=True)
    if grads == "existing":
        loss_fn(model, batch).backward()
    direction = update_direction(model, loss_fn, batch)
    with state_unchanged(model):
        result = critical_sharpness(model, loss_fn, batch, direction, method=method)
    assert result.status == "ok"
    assert any(math.isnan(loss) for _, loss in result.probes)
    assert math.isfinite(result.eta) and result.eta > 0
    lo, hi = result.bracket
    nan_etas = [eta for eta, loss in result.probes if math.isnan(loss)]
    assert hi == min(nan_etas)  # the smallest NaN probe closes the bracket from above
    assert lo < hi


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_critical_sharpness_ascent_direction_is_not_descent_when_loss_rounding_is_coarse(method):
    # float32 loss with a large constant offset: the loss's ulp (~6e-5) is far coarser than
    # the parameter rounding the search's eta_min is derived from.
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen))

    def loss_fn(model, batch):
        return ce_loss(model, batch) + 1000.0

    ascent = [-g for g in update_direction(model, loss_fn, batch)]
    with state_unchanged(model):
        result = critical_sharpness(model, loss_fn, batch, ascent, method=method)
    # The loss never went below L0 at any probe: -g is not a descent direction.
    assert all(loss >= result.loss0 for _, loss in result.probes)
    assert result.status == "not_descent", (result.status, result.sharpness)


@pytest.mark.parametrize("method", ["fast", "paper"])
def test_critical_sharpness_budget_and_warm_start_outcomes_restore_state(method, grads):
    case = make_case("bn_mlp")
    give_grads(case, grads)
    direction = update_direction(case.model, case.loss_fn, case.batch, mode=None)
    with state_unchanged(case.model):
        short = critical_sharpness(
            case.model, case.loss_fn, case.batch, direction, method=method, max_evals=3, mode=None
        )
        first = critical_sharpness(case.model, case.loss_fn, case.batch, direction, method=method, mode=None)
        warm = critical_sharpness(
            case.model, case.loss_fn, case.batch, direction, method=method, warm_start=first, mode=None
        )
        capped = critical_sharpness(
            case.model, case.loss_fn, case.batch, direction, method=method, mode=None,
            eta_max=first.eta / 64,
        )
    assert short.status == "max_evals" and short.evals == 3
    assert first.status == warm.status == "ok"
    assert warm.probes[0][0] == first.eta  # the warm start's eta_c is the first probe
    assert capped.status == "no_increase"


def test_critical_sharpness_inside_no_grad_keeps_grad_mode():
    case = make_case("gpt")
    direction = update_direction(case.model, case.loss_fn, case.batch)
    with torch.no_grad():
        with state_unchanged(case.model) as before:
            critical_sharpness(case.model, case.loss_fn, case.batch, direction)
    assert before.data["grad_enabled"] is False


class EMANorm(nn.Module):
    """Subtracts a running mean that it keeps in a buffer, updated by *rebinding* the
    buffer attribute in train mode (legal PyTorch: assignment to a registered buffer name
    replaces the tensor in ``_buffers``), as many custom normalisers and caches do."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(width, dtype=torch.float64))

    def forward(self, x):
        if self.training:
            self.running_mean = 0.9 * self.running_mean + 0.1 * x.detach().mean(0)
        return x - self.running_mean


@pytest.mark.parametrize("call", ["critical_sharpness", "hessian_vector_product"])
def test_buffer_rebound_by_module_forward_is_restored(call):
    model = nn.Sequential(nn.Linear(4, 8), EMANorm(8), nn.Tanh(), nn.Linear(8, 3)).double()
    model.train()
    gen = torch.Generator().manual_seed(0)
    batch = (torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen))
    direction = update_direction(model, ce_loss, batch, mode="eval")
    with state_unchanged(model):
        if call == "critical_sharpness":
            critical_sharpness(model, ce_loss, batch, direction, mode="train")
        else:
            hessian_vector_product(model, ce_loss, batch, direction, mode="train")


# --------------------------------------------------------------------------------------
# update_direction and relative_critical_sharpness, with and without an optimizer
# --------------------------------------------------------------------------------------

OPTIMIZERS = ["none", "adamw_empty", "adamw_stepped", "sgd_momentum_empty", "sgd_momentum_stepped"]


def make_optimizer(name: str, case: Case):
    if name == "none":
        return None
    if name.startswith("adamw"):
        opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        opt = torch.optim.SGD(case.model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.01)
    if name.endswith("stepped"):
        train_steps(case, opt, 2)
    return opt


def reference_direction(case: Case, opt, mode: str = "eval"):
    """What update_direction should return: the real step on a deep copy, differenced."""
    model_c, opt_c = twin(case.model, opt)
    model_c.eval() if mode == "eval" else model_c.train()
    params = trainable(model_c)
    gs = torch.autograd.grad(case.loss_fn(model_c, case.batch), params, allow_unused=True)
    if opt_c is None:
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]
    for p, g in zip(params, gs):
        p.grad = torch.zeros_like(p) if g is None else g.clone()
    before = [p.detach().clone() for p in params]
    opt_c.step()
    lr = opt_c.param_groups[0]["lr"]
    return [(b - p.detach()) / lr for b, p in zip(before, params)]


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize("kind", ["mlp", "unused", "frozen", "bn_mlp"])
def test_update_direction_restores_model_and_optimizer_state(kind, opt_name, grads):
    case = make_case(kind)
    opt = make_optimizer(opt_name, case)
    give_grads(case, grads)
    was_empty = opt is not None and len(opt.state) == 0
    with state_unchanged(case.model, opt):
        d = update_direction(case.model, case.loss_fn, case.batch, opt)
    if was_empty:
        assert len(opt.state) == 0
        assert opt.state_dict()["state"] == {}
    params = trainable(case.model)
    assert [t.shape for t in d] == [p.shape for p in params]
    expected = reference_direction(case, opt)
    for got, want in zip(d, expected):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opt_name", OPTIMIZERS)
@pytest.mark.parametrize("kind", ["mlp", "unused", "gpt"])
def test_relative_critical_sharpness_restores_model_and_optimizer_state(kind, opt_name, grads):
    case = make_case(kind)
    opt = make_optimizer(opt_name, case)
    give_grads(case, grads)
    was_empty = opt is not None and len(opt.state) == 0
    with state_unchanged(case.model, opt):
        result = relative_critical_sharpness(
            case.model, case.loss_fn, case.batch, case.loss_fn, case.batch2, optimizer=opt,
            max_evals=16,
        )
    assert isinstance(result, CriticalSharpnessResult)
    assert math.isfinite(result.loss0)
    if was_empty:
        assert len(opt.state) == 0


def test_relative_critical_sharpness_in_train_mode_with_dropout_restores_state(grads):
    case = make_case("gpt")
    opt = make_optimizer("adamw_stepped", case)
    give_grads(case, grads)
    with state_unchanged(case.model, opt):
        relative_critical_sharpness(
            case.model, case.loss_fn, [case.batch, case.batch2], case.loss_fn, case.batch2,
            optimizer=opt, mode="train", method="paper",
        )


@pytest.mark.parametrize("opt_name", ["adamw_empty", "adamw_stepped", "sgd_momentum_stepped"])
def test_update_direction_loss_fn_raising_restores_model_and_optimizer(opt_name, grads):
    case = make_case("bn_mlp")
    opt = make_optimizer(opt_name, case)
    give_grads(case, grads)
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = ce_loss(model, batch)
        if calls["n"] == 2:
            raise Boom("second batch")
        return loss

    with state_unchanged(case.model, opt):
        with pytest.raises(Boom):
            update_direction(case.model, loss_fn, [case.batch, case.batch2], opt, mode="train")


@pytest.mark.parametrize("opt_name", ["adamw_empty", "adamw_stepped", "sgd_momentum_stepped"])
def test_update_direction_optimizer_step_raising_restores_model_and_optimizer(opt_name, grads):
    case = make_case("unused")
    opt = make_optimizer(opt_name, case)
    give_grads(case, grads)

    def fail_after_step(optimizer, args, kwargs):  # runs after the step has moved everything
        raise Boom("post-step hook")

    handle = opt.register_step_post_hook(fail_after_step)
    try:
        with state_unchanged(case.model, opt):
            with pytest.raises(Boom, match="post-step hook"):
                update_direction(case.model, case.loss_fn, case.batch, opt)
    finally:
        handle.remove()


def test_update_direction_frozen_parameter_with_stale_grad_is_restored():
    # A parameter frozen after it got a .grad: the optimizer's step moves it (its grad is
    # not None), so the guard has to put back the frozen value and the optimizer state.
    case = make_case("mlp")
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2)
    train_steps(case, opt, 1)
    give_grads(case, "existing")
    case.model[0].bias.requires_grad_(False)
    with state_unchanged(case.model, opt):
        d = update_direction(case.model, case.loss_fn, case.batch, opt)
    assert len(d) == len(trainable(case.model))


def test_hessian_operator_jvp_propagates_runtime_error_from_loss_fn():
    case = make_case("mlp")
    v = random_vector(case.model)
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("transient failure in loss_fn")
        return ce_loss(model, batch)

    with state_unchanged(case.model):
        with pytest.raises(RuntimeError, match="transient failure"):
            with HessianOperator(case.model, loss_fn, case.batch, method="jvp") as op:
                for _ in range(3):
                    op.matvec(v)


# --------------------------------------------------------------------------------------
# DirectionCapture around a real optimizer step
# --------------------------------------------------------------------------------------


def test_direction_capture_sgd_is_the_gradient_and_aligns_with_trainable_params():
    case = make_case("frozen")
    model = case.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    give_grads(case, "existing")
    params = trainable(model)
    grads_ = [p.grad.clone() for p in params]
    frozen_before = model[0].bias.detach().clone()
    before = [p.detach().clone() for p in params]
    with DirectionCapture(model, optimizer=opt) as cap:
        opt.step()
    d = cap.direction
    assert len(d) == len(params) == len(list(model.parameters())) - 1
    assert [t.shape for t in d] == [p.shape for p in params]
    for t, b, p, g in zip(d, before, params, grads_):
        assert torch.equal(t, (b - p.detach()) / 0.1)
        torch.testing.assert_close(t, g, rtol=1e-9, atol=1e-12)
    assert torch.equal(model[0].bias, frozen_before)
    assert cap.lr == 0.1


def adamw_reference(p0, g, state, group):
    """torch.optim.AdamW's step written out: d = wd·θ + m̂/(√v̂ + ε)."""
    beta1, beta2 = group["betas"]
    m = state.get("exp_avg", torch.zeros_like(p0))
    v = state.get("exp_avg_sq", torch.zeros_like(p0))
    t = float(state["step"]) + 1 if "step" in state else 1.0
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1**t)
    v_hat = v / (1 - beta2**t)
    return group["weight_decay"] * p0 + m_hat / (v_hat.sqrt() + group["eps"])


@pytest.mark.parametrize("steps_before", [0, 2])
@pytest.mark.parametrize("kind", ["frozen", "unused", "bn_mlp"])
def test_direction_capture_adamw_matches_the_adamw_formula(kind, steps_before):
    case = make_case(kind)
    model = case.model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    train_steps(case, opt, steps_before)
    give_grads(case, "existing")
    params = trainable(model)
    by_param = {p: copy.deepcopy(opt.state[p]) if p in opt.state else {} for p in params}
    before = [p.detach().clone() for p in params]
    with DirectionCapture(model, optimizer=opt) as cap:
        opt.step()
    d = cap.direction
    assert [t.shape for t in d] == [p.shape for p in params]
    group = opt.param_groups[0]
    for t, b, p in zip(d, before, params):
        assert torch.equal(t, (b - p.detach()) / group["lr"])
        if p.grad is None:  # the unused parameter: AdamW skips it, d = 0
            assert torch.equal(t, torch.zeros_like(t))
        else:
            torch.testing.assert_close(
                t, adamw_reference(b, p.grad, by_param[p], group), rtol=1e-8, atol=1e-10
            )


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_direction_capture_does_not_change_the_step(opt_name):
    case = make_case("unused")
    make = {
        "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05),
    }[opt_name]
    opt = make(case.model.parameters())
    train_steps(case, opt, 1)
    give_grads(case, "existing")
    twin_model, twin_opt = twin(case.model, opt)
    twin_opt.step()
    with DirectionCapture(case.model, optimizer=opt, keep_before=True) as cap:
        opt.step()
    assert_same_values(snapshot(twin_model, twin_opt), snapshot(case.model, opt))
    assert cap.before is not None and len(cap.before) == len(trainable(case.model))


def test_direction_capture_records_nothing_when_the_step_raises():
    case = make_case("mlp")
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    give_grads(case, "existing")
    with pytest.raises(Boom):
        with DirectionCapture(case.model, optimizer=opt) as cap:
            raise Boom
    assert cap.direction is None


# --------------------------------------------------------------------------------------
# SharpnessMonitor in a real training loop
# --------------------------------------------------------------------------------------

MONITOR_STEPS = 12
MONITOR_KEYS = {
    "sharpness/critical", "sharpness/eta_c", "sharpness/lr_over_eta_c", "sharpness/evals",
}


def train_gpt(monitor_kwargs: dict | None, steps: int = MONITOR_STEPS):
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    model = GPT(GPTConfig(**GPT_CFG, dropout=0.1))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(1)
    batches = [gpt_batch(gen) for _ in range(steps)]
    probe = gpt_batch(gen)
    monitor = None
    if monitor_kwargs is not None:
        monitor = SharpnessMonitor(model, ce_loss, probe, opt, every=3, **monitor_kwargs)
    trace, latest = [], []
    for step, batch in enumerate(batches):
        loss = ce_loss(model, batch)  # dropout draws from the global torch RNG
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if monitor is None:
            opt.step()
        else:
            with monitor.around_step(step):
                opt.step()
            latest.append(monitor.latest)
        # The loop also draws from numpy and python random each step.
        trace.append((loss.item(), float(np.random.rand()), random.random()))
    return model, opt, trace, latest, monitor, probe


MONITOR_SETTINGS = [
    dict(at="before", mode="eval"),
    dict(at="after", mode="train"),
    dict(at="before", mode="train", method="paper"),
]


@pytest.fixture(scope="module")
def unmonitored_run():
    model, opt, trace, _, _, _ = train_gpt(None)
    return snapshot(model, opt), trace


@pytest.mark.parametrize("settings", MONITOR_SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_monitored_training_is_bit_identical_to_unmonitored(settings, unmonitored_run):
    expected, expected_trace = unmonitored_run
    model, opt, trace, latest, monitor, _ = train_gpt(settings)
    assert trace == expected_trace  # every loss and every numpy/python draw
    assert_same_values(expected, snapshot(model, opt))
    assert monitor.measurements == 4
    for step, metrics in enumerate(latest):
        if step % 3 == 0:
            optional = {"sharpness/descent_step", "sharpness/descent_probe", "sharpness/critical_se",
                        "sharpness/eta_c_se"}
            assert metrics is not None and MONITOR_KEYS <= set(metrics) <= MONITOR_KEYS | optional | {
                k for k in metrics if k.startswith("sharpness/failed/")}
            assert metrics["sharpness/evals"] >= 2
            eta = metrics["sharpness/eta_c"]
            if math.isfinite(eta):
                assert metrics["sharpness/critical"] == pytest.approx(2.0 / eta)
                assert metrics["sharpness/lr_over_eta_c"] == pytest.approx(3e-3 / eta)
            else:  # an outcome without a bracket (e.g. not a descent direction on the probe)
                assert math.isnan(metrics["sharpness/critical"])
                assert math.isnan(metrics["sharpness/lr_over_eta_c"])
        else:
            assert metrics is None


def test_monitor_state_dict_round_trips_and_resumes_identically():
    model, opt, _, _, monitor, probe = train_gpt(dict(at="before", mode="eval"))
    state = monitor.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["measurements"] == 4

    twin_model, twin_opt = twin(model, opt)
    resumed = SharpnessMonitor(twin_model, ce_loss, probe, twin_opt, every=3)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state

    # One more due step on both: the resumed monitor measures exactly like the original.
    batch = gpt_batch(torch.Generator().manual_seed(99))
    rng = torch.get_rng_state()
    for m, o, mon in ((model, opt, monitor), (twin_model, twin_opt, resumed)):
        torch.set_rng_state(rng)
        o.zero_grad(set_to_none=True)
        ce_loss(m, batch).backward()
        with mon.around_step(MONITOR_STEPS):
            o.step()
    assert resumed.latest == monitor.latest
    assert resumed.state_dict() == monitor.state_dict()
    assert_same_values(snapshot(model, opt), snapshot(twin_model, twin_opt))


def test_monitor_step_that_raises_records_nothing_and_propagates():
    case = make_case("mlp")
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    monitor = SharpnessMonitor(case.model, case.loss_fn, case.batch, opt, every=1)
    give_grads(case, "existing")
    with state_unchanged(case.model, opt):
        with pytest.raises(Boom):
            with monitor.around_step(0):
                raise Boom
    assert monitor.latest is None and monitor.measurements == 0


# --------------------------------------------------------------------------------------
# HessianOperator / GGNOperator as context managers
# --------------------------------------------------------------------------------------

OPERATOR_CASES = [
    ("mlp", "eval"),
    ("bn_mlp", None),  # train mode: running stats move on every forward
    ("bn_mlp", "train"),
    ("unused", "eval"),
    ("frozen", "train"),
    ("gpt", "train"),
    ("gpt", "eval"),
]


@pytest.mark.parametrize("kind, mode", OPERATOR_CASES)
@pytest.mark.parametrize("method", ["reuse", "double", "jvp"])
def test_hessian_operator_context_restores_state(kind, mode, method, grads):
    case = make_case(kind)
    give_grads(case, grads)
    v = random_vector(case.model)
    with state_unchanged(case.model):
        with HessianOperator(case.model, case.loss_fn, [case.batch, case.batch2], method=method, mode=mode) as op:
            hv1 = op.matvec(v)
            hv2 = op.matvec(v)
            g = op.gradient()
    assert op.matvecs == 2
    assert len(hv1) == len(g) == len(trainable(case.model))
    for a, b in zip(hv1, hv2):
        torch.testing.assert_close(a, b)
    if kind == "unused":  # the unused parameter's rows of H are zero
        i = next(i for i, p in enumerate(trainable(case.model)) if p is case.model.unused)
        assert torch.equal(hv1[i], torch.zeros_like(hv1[i]))
        assert torch.equal(g[i], torch.zeros_like(g[i]))


def test_hessian_operator_methods_agree():
    case = make_case("mlp")
    v = random_vector(case.model)
    out = {}
    for method in ("reuse", "double", "jvp"):
        with HessianOperator(case.model, case.loss_fn, case.batch, method=method) as op:
            out[method] = op.matvec(v)
    for method in ("double", "jvp"):
        for a, b in zip(out["reuse"], out[method]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind, mode", [("bn_mlp", None), ("gpt", "train"), ("unused", "eval")])
@pytest.mark.parametrize("method", ["reuse", "double", "jvp"])
def test_exception_inside_hessian_operator_block_restores_state(kind, mode, method, grads):
    case = make_case(kind)
    give_grads(case, grads)
    v = random_vector(case.model)
    with state_unchanged(case.model):
        with pytest.raises(Boom, match="inside the block"):
            with HessianOperator(case.model, case.loss_fn, case.batch, method=method, mode=mode) as op:
                op.matvec(v)
                with torch.no_grad():  # even a user write to the parameters is undone
                    for p in op.params:
                        p.add_(1.0)
                raise Boom("inside the block")


@pytest.mark.parametrize("method, raise_on", [("reuse", 1), ("double", 3), ("jvp", 3)])
def test_hessian_operator_loss_fn_raising_restores_state(method, raise_on, grads):
    case = make_case("bn_mlp")
    give_grads(case, grads)
    v = random_vector(case.model)
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = ce_loss(model, batch)
        if calls["n"] == raise_on:
            raise Boom("loss_fn failed")
        return loss

    with state_unchanged(case.model):
        with pytest.raises(Boom, match="loss_fn failed"):
            with HessianOperator(case.model, loss_fn, case.batch, method=method, mode=None) as op:
                for _ in range(3):
                    op.matvec(v)
    assert calls["n"] == raise_on


@pytest.mark.parametrize("kind, mode", [("bn_mlp", None), ("unused", "eval"), ("gpt", "train"), ("frozen", "eval")])
def test_ggn_operator_context_restores_state(kind, mode, grads):
    case = make_case(kind)
    give_grads(case, grads)
    v = random_vector(case.model)
    with state_unchanged(case.model):
        with GGNOperator(case.model, case.forward_fn, [case.batch, case.batch2], mode=mode) as op:
            gv = op.matvec(v)
            hv = op.hessian_matvec(v)
            fv = op.functional_matvec(v)
            op.gradient()
    for a, b, c in zip(hv, gv, fv):
        torch.testing.assert_close(a - b, c)


def test_exception_inside_ggn_operator_block_restores_state(grads):
    case = make_case("bn_mlp")
    give_grads(case, grads)
    with state_unchanged(case.model):
        with pytest.raises(Boom):
            with GGNOperator(case.model, case.forward_fn, case.batch, mode=None) as op:
                op.matvec(random_vector(case.model))
                raise Boom


# --------------------------------------------------------------------------------------
# One-shot products and solvers
# --------------------------------------------------------------------------------------


def _hvp(case, mode, method):
    return hessian_vector_product(
        case.model, case.loss_fn, case.batch, random_vector(case.model), method=method, mode=mode
    )


CALLS = {
    "hvp_double": lambda case, mode: _hvp(case, mode, "double"),
    "hvp_jvp": lambda case, mode: _hvp(case, mode, "jvp"),
    "hvp_reuse": lambda case, mode: _hvp(case, mode, "reuse"),
    "ggn_vector_product": lambda case, mode: ggn_vector_product(
        case.model, case.forward_fn, case.batch, random_vector(case.model), mode=mode
    ),
    "eigen_lanczos": lambda case, mode: hessian_eigenvalues(
        case.model, case.loss_fn, case.batch, k=2, max_iter=5, mode=mode
    ),
    "eigen_power": lambda case, mode: hessian_eigenvalues(
        case.model, case.loss_fn, case.batch, method="power", max_iter=5, mode=mode
    ),
    "eigen_lanczos_double_two_batches": lambda case, mode: hessian_eigenvalues(
        case.model, case.loss_fn, [case.batch, case.batch2], max_iter=4, product="double", mode=mode
    ),
    "trace_hutchinson": lambda case, mode: hessian_trace(
        case.model, case.loss_fn, case.batch, samples=4, mode=mode
    ),
    "trace_hutchpp": lambda case, mode: hessian_trace(
        case.model, case.loss_fn, case.batch, method="hutch++", samples=6, mode=mode
    ),
    "decomposition": lambda case, mode: sharpness_gradient_decomposition(
        case.model, case.forward_fn, [case.batch, case.batch2], mode=mode
    ),
}


@pytest.mark.parametrize("kind, mode", [("bn_mlp", None), ("unused", "eval"), ("gpt", "train"), ("frozen", "eval")])
@pytest.mark.parametrize("call", list(CALLS))
def test_curvature_call_leaves_state_bit_identical(call, kind, mode, grads):
    case = make_case(kind)
    give_grads(case, grads)
    with state_unchanged(case.model):
        result = CALLS[call](case, mode)
    assert result is not None


def test_hessian_eigenvalues_inside_no_grad_keeps_grad_disabled():
    case = make_case("bn_mlp")
    with torch.no_grad():
        with state_unchanged(case.model) as before:
            hessian_eigenvalues(case.model, case.loss_fn, case.batch, max_iter=3, mode=None)
        assert before.data["grad_enabled"] is False
        assert not torch.is_grad_enabled()


def test_hessian_trace_block_traces_cover_trainable_parameters_only():
    case = make_case("frozen")
    with state_unchanged(case.model):
        result = hessian_trace(case.model, case.loss_fn, case.batch, samples=4)
    names = [n for n, p in case.model.named_parameters() if p.requires_grad]
    assert list(result.by_parameter) == names
    assert result.n_params == sum(p.numel() for p in trainable(case.model))


# --------------------------------------------------------------------------------------
# preconditioned_sharpness
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("kind, mode", [("bn_mlp", None), ("gpt", "train"), ("frozen", "eval")])
def test_preconditioned_sharpness_after_adamw_steps_restores_model_and_optimizer(kind, mode, amsgrad, grads):
    case = make_case(kind)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2, amsgrad=amsgrad)
    train_steps(case, opt, 2)
    give_grads(case, grads)
    with state_unchanged(case.model, opt):
        result = preconditioned_sharpness(
            case.model, case.loss_fn, case.batch, opt, max_iter=5, mode=mode
        )
    assert math.isfinite(result.value)
    assert result.threshold == pytest.approx((2 + 2 * 0.9) / (0.1 * 1e-2))


@pytest.mark.parametrize("kind", ["bn_mlp", "gpt"])
def test_preconditioned_sharpness_before_first_step_raises_clear_value_error(kind, grads):
    case = make_case(kind)
    opt = torch.optim.AdamW(case.model.parameters(), lr=1e-2)
    give_grads(case, grads)
    with state_unchanged(case.model, opt):
        with pytest.raises(ValueError, match="take at least one"):
            preconditioned_sharpness(case.model, case.loss_fn, case.batch, opt, max_iter=5)
    assert len(opt.state) == 0
    assert opt.state_dict()["state"] == {}
