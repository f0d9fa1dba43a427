"""H·v, G·v, eigenvalues, trace, preconditioned sharpness and the decomposition, each
against dense float64 references (tests/support/dense_reference.py) or closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from support.dense_reference import (
    cross_entropy_loss, dense_ggn, dense_gradient, dense_hessian, functional_loss,
    least_squares_loss, least_squares_problem, logits_forward, mlp_batches,
    tiny_mlp, tiny_transformer, to_flat, token_batches,
)
from sharpscope.curvature import (
    GGNOperator, HessianOperator, adam_preconditioner, ggn_vector_product, hessian_eigenvalues,
    hessian_trace, hessian_vector_product, preconditioned_sharpness,
    sharpness_gradient_decomposition,
)

MODELS = {
    "mlp": (tiny_mlp, lambda count=1: mlp_batches(count=count)),
    "transformer": (tiny_transformer, lambda count=1: token_batches(count=count)),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def dense_case(request):
    """(model, batches, dense H) for each tiny float64 model, two batches each."""
    make_model, make_batches = MODELS[request.param]
    model, batches = make_model(), make_batches(count=2)
    return request.param, model, batches, dense_hessian(model, cross_entropy_loss, batches)


def params_of(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_dense_reference_agrees_with_finite_differences(dense_case):
    _, model, batches, H = dense_case
    assert torch.allclose(H, H.T, atol=1e-10)
    f, flat0 = functional_loss(model, cross_entropy_loss, batches)
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(flat0.numel(), generator=gen, dtype=torch.float64)
    v /= v.norm()
    h = 1e-5

    def grad_at(x):
        x = x.clone().requires_grad_(True)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.MATH]):
            return torch.autograd.grad(f(x), x)[0]

    fd = (grad_at(flat0 + h * v) - grad_at(flat0 - h * v)) / (2 * h)
    assert torch.allclose(fd, H @ v, rtol=1e-5, atol=1e-6 * float((H @ v).abs().max()))


@pytest.mark.parametrize("method", ["reuse", "double", "jvp"])
def test_hessian_vector_product_matches_dense(dense_case, method):
    _, model, batches, H = dense_case
    gen = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params_of(model)]
    with HessianOperator(model, cross_entropy_loss, batches, method=method) as op:
        hv = op.matvec(v)
        assert op.matvecs == 1
    assert torch.allclose(to_flat(hv), H @ to_flat(v), rtol=1e-9, atol=1e-11)


def test_single_product_function_matches_operator(dense_case):
    _, model, batches, H = dense_case
    v = [torch.ones_like(p) for p in params_of(model)]
    hv = hessian_vector_product(model, cross_entropy_loss, batches, v)
    assert torch.allclose(to_flat(hv), H @ to_flat(v), rtol=1e-9, atol=1e-11)


def test_top3_eigenvalues_match_dense_eigh(dense_case):
    _, model, batches, H = dense_case
    truth = torch.linalg.eigvalsh(H).flip(0)[:3]
    result = hessian_eigenvalues(model, cross_entropy_loss, batches, k=3)
    assert result.converged
    assert result.values == sorted(result.values, reverse=True)
    for got, want in zip(result.values, truth.tolist()):
        assert abs(got - want) <= 1e-4 * abs(want)
    assert result.matvecs < H.shape[0]


def test_smallest_eigenvalue_and_ritz_vector(dense_case):
    _, model, batches, H = dense_case
    evals = torch.linalg.eigvalsh(H)
    low = hessian_eigenvalues(model, cross_entropy_loss, batches, which="smallest", max_iter=H.shape[0])
    assert abs(low.values[0] - float(evals[0])) <= 1e-4 * float(evals.abs().max())
    top = hessian_eigenvalues(model, cross_entropy_loss, batches, return_vectors=True)
    u = to_flat(top.vectors[0])
    assert abs(float(u.norm()) - 1.0) < 1e-8
    assert torch.allclose(H @ u, top.values[0] * u, atol=1e-4 * abs(top.values[0]))


def test_power_iteration_finds_largest_magnitude_with_more_products():
    model, batch, H, _ = least_squares_problem()
    lanczos = hessian_eigenvalues(model, least_squares_loss, [batch], tol=1e-8)
    power = hessian_eigenvalues(model, least_squares_loss, [batch], method="power", tol=1e-8)
    truth = float(torch.linalg.eigvalsh(H)[-1])
    assert abs(lanczos.values[0] - truth) < 1e-8 * truth
    assert abs(power.values[0] - truth) < 1e-5 * truth
    assert power.matvecs > lanczos.matvecs


def test_trace_within_three_standard_errors(dense_case):
    _, model, batches, H = dense_case
    truth = float(torch.trace(H))
    result = hessian_trace(model, cross_entropy_loss, batches, samples=64, seed=5)
    assert result.stderr > 0
    assert abs(result.estimate - truth) <= 3 * result.stderr
    assert result.matvecs == 64
    assert result.n_params == H.shape[0]
    assert math.isclose(result.per_param, result.estimate / H.shape[0])
    assert math.isclose(sum(result.by_parameter.values()), result.estimate, rel_tol=1e-9, abs_tol=1e-9)


def test_block_traces_match_dense_diagonal_blocks():
    model, batches = tiny_mlp(), mlp_batches(count=1)
    H = dense_hessian(model, cross_entropy_loss, batches)
    result = hessian_trace(model, cross_entropy_loss, batches, samples=400, seed=2)
    start = 0
    for (name, p) in model.named_parameters():
        block = float(torch.diagonal(H)[start : start + p.numel()].sum())
        start += p.numel()
        # Each block estimate is a Hutchinson mean of its own, with its own standard error.
        se = result.by_parameter_stderr[name]
        assert 0 < se < 0.2 * abs(float(torch.trace(H)))
        assert abs(result.by_parameter[name] - block) <= 3.5 * se + 1e-12


def test_hutchpp_is_exact_when_the_sketch_spans_the_space():
    model, batch, H, _ = least_squares_problem(n_features=6)
    result = hessian_trace(model, least_squares_loss, [batch], method="hutch++", samples=21)
    assert abs(result.estimate - float(torch.trace(H))) < 1e-9 * float(torch.trace(H))


def test_hutchpp_within_three_standard_errors(dense_case):
    _, model, batches, H = dense_case
    result = hessian_trace(model, cross_entropy_loss, batches, method="hutch++", samples=60, seed=1)
    assert abs(result.estimate - float(torch.trace(H))) <= 3 * result.stderr


def test_least_squares_closed_forms():
    model, batch, H, _ = least_squares_problem()
    top = hessian_eigenvalues(model, least_squares_loss, batch, k=2, tol=1e-10)
    truth = torch.linalg.eigvalsh(H).flip(0)
    assert top.values == pytest.approx(truth[:2].tolist(), rel=1e-10)
    trace = hessian_trace(model, least_squares_loss, batch, samples=200)
    assert abs(trace.estimate - float(torch.trace(H))) <= 3 * trace.stderr


def test_several_batches_give_the_mean_product():
    model, batches = tiny_mlp(), mlp_batches(count=3)
    v = [torch.randn_like(p) for p in params_of(model)]
    each = [to_flat(hessian_vector_product(model, cross_entropy_loss, [b], v)) for b in batches]
    together = to_flat(hessian_vector_product(model, cross_entropy_loss, batches, v))
    assert torch.allclose(together, sum(each) / 3, rtol=1e-12, atol=1e-14)


class _WithUnused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = tiny_mlp()
        self.extra = torch.nn.Linear(2, 2).double()  # never used by forward

    def forward(self, x):
        return self.body(x)


def test_unused_parameter_has_zero_curvature():
    model, batches = _WithUnused(), mlp_batches()
    v = [torch.ones_like(p) for p in params_of(model)]
    hv = hessian_vector_product(model, cross_entropy_loss, batches, v)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, h in zip(names, hv):
        if name.startswith("extra"):
            assert torch.count_nonzero(h) == 0
    H = dense_hessian(model.body, cross_entropy_loss, batches)
    n_body = len(params_of(model.body))
    assert torch.allclose(to_flat(hv[:n_body]), H @ to_flat(v[:n_body]), rtol=1e-9, atol=1e-11)


def test_dropout_in_train_mode_is_a_fixed_function():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 4)
    ).double()
    batches = mlp_batches()
    v = [torch.randn_like(p) for p in params_of(model)]
    first = hessian_vector_product(model, cross_entropy_loss, batches, v, mode="train")
    second = hessian_vector_product(model, cross_entropy_loss, batches, v, mode="train")
    evaluated = hessian_vector_product(model, cross_entropy_loss, batches, v, mode="eval")
    assert torch.equal(to_flat(first), to_flat(second))
    assert not torch.allclose(to_flat(first), to_flat(evaluated))


def test_batchnorm_model_uses_running_statistics_in_eval_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Linear(6, 4)
    ).double()
    batches = mlp_batches()
    model.train()
    with torch.no_grad():
        model(batches[0][0])  # move the running statistics off their initial values
    model.eval()
    H = dense_hessian(model, cross_entropy_loss, batches)
    model.train()
    top = hessian_eigenvalues(model, cross_entropy_loss, batches, tol=1e-8)
    assert abs(top.values[0] - float(torch.linalg.eigvalsh(H)[-1])) < 1e-6 * abs(top.values[0])
    assert model.training


@pytest.fixture(scope="module", params=sorted(MODELS))
def ggn_case(request):
    make_model, make_batches = MODELS[request.param]
    model, batches = make_model(), make_batches(count=2)
    G = dense_ggn(model, logits_forward, batches)
    H = dense_hessian(model, cross_entropy_loss, batches)
    g = dense_gradient(model, cross_entropy_loss, batches)
    return model, batches, G, H, g


def test_ggn_vector_product_matches_dense_jacobian_form(ggn_case):
    model, batches, G, _, _ = ggn_case
    gen = torch.Generator().manual_seed(4)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params_of(model)]
    gv = ggn_vector_product(model, logits_forward, batches, v)
    assert torch.allclose(to_flat(gv), G @ to_flat(v), rtol=1e-9, atol=1e-11)
    assert float(to_flat(v) @ to_flat(gv)) >= 0.0  # G is PSD


def test_ggn_operator_splits_the_hessian(ggn_case):
    model, batches, G, H, _ = ggn_case
    v = [torch.ones_like(p) for p in params_of(model)]
    with GGNOperator(model, logits_forward, batches) as op:
        hv = op.hessian_matvec(v)
        fv = op.functional_matvec(v)
    assert torch.allclose(to_flat(hv), H @ to_flat(v), rtol=1e-9, atol=1e-11)
    assert torch.allclose(to_flat(fv), (H - G) @ to_flat(v), rtol=1e-8, atol=1e-10)


def test_decomposition_matches_dense_and_sums_to_one(ggn_case):
    model, batches, G, H, g = ggn_case
    eps = g / g.norm()
    delta, logit = H @ eps, G @ eps
    func = delta - logit
    dd = float(delta @ delta)
    result = sharpness_gradient_decomposition(model, logits_forward, batches)
    assert result.tau_logit == pytest.approx(float(logit @ logit) / dd, rel=1e-8)
    assert result.tau_func == pytest.approx(float(func @ func) / dd, rel=1e-8)
    assert result.tau_cross == pytest.approx(2 * float(logit @ func) / dd, rel=1e-7, abs=1e-10)
    assert result.tau_logit + result.tau_func + result.tau_cross == pytest.approx(1.0, abs=1e-12)
    assert result.grad_norm == pytest.approx(float(g.norm()), rel=1e-10)
    assert result.curvature == pytest.approx(float(eps @ H @ eps), rel=1e-8)


def test_decomposition_refuses_a_zero_gradient():
    model, batches = tiny_mlp(), mlp_batches()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # constant logits: the CE gradient w.r.t. the last bias is nonzero...
    # ...so use a loss that is flat instead: targets and a zero-output MSE
    def zero_loss(outputs, batch):
        return (outputs * 0.0).sum()

    with pytest.raises(ValueError, match="gradient norm"):
        sharpness_gradient_decomposition(model, logits_forward, batches, output_loss_fn=zero_loss)


def _adam_after_steps(model, loss_fn, batches, steps=3, lr=1e-2, **kwargs):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        sum(loss_fn(model, b) for b in batches).backward()
        opt.step()
    opt.zero_grad()
    return opt


@pytest.mark.parametrize("amsgrad", [False, True])
def test_preconditioned_sharpness_matches_dense(amsgrad):
    model, batches = tiny_mlp(), mlp_batches()
    opt = _adam_after_steps(model, cross_entropy_loss, batches, amsgrad=amsgrad, betas=(0.9, 0.99))
    H = dense_hessian(model, cross_entropy_loss, batches)
    P = to_flat(adam_preconditioner(model, opt))
    # P from the optimizer's formula, independently
    key = "max_exp_avg_sq" if amsgrad else "exp_avg_sq"
    manual = torch.cat([
        (opt.state[p][key] / (1 - 0.99 ** float(opt.state[p]["step"]))).sqrt().reshape(-1) + 1e-8
        for p in model.parameters()
    ])
    assert torch.allclose(P, manual, rtol=1e-12)
    D = torch.diag(P.rsqrt())
    truth = float(torch.linalg.eigvalsh(D @ H @ D)[-1])
    result = preconditioned_sharpness(model, cross_entropy_loss, batches, opt, tol=1e-8)
    assert result.value == pytest.approx(truth, rel=1e-6)
    assert result.threshold == pytest.approx(38 / 1e-2)
    assert result.ratio == pytest.approx(truth / (38 / 1e-2), rel=1e-6)


def test_preconditioned_sharpness_needs_adam_state():
    model, batches = tiny_mlp(), mlp_batches()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="take"):
        preconditioned_sharpness(model, cross_entropy_loss, batches, opt)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    with pytest.raises(ValueError, match="Adam"):
        preconditioned_sharpness(model, cross_entropy_loss, batches, sgd)


def test_vector_of_wrong_shape_is_refused():
    model, batches = tiny_mlp(), mlp_batches()
    with pytest.raises(ValueError, match="shape"):
        hessian_vector_product(model, cross_entropy_loss, batches, [torch.ones(3) for _ in params_of(model)])
    with pytest.raises(ValueError, match="tensors"):
        hessian_vector_product(model, cross_entropy_loss, batches, [torch.ones(1)])


def test_bad_options_are_refused():
    model, batches = tiny_mlp(), mlp_batches()
    with pytest.raises(ValueError, match="method"):
        hessian_eigenvalues(model, cross_entropy_loss, batches, method="arnoldi")
    with pytest.raises(ValueError, match="power"):
        hessian_eigenvalues(model, cross_entropy_loss, batches, k=2, method="power")
    with pytest.raises(ValueError, match="k must"):
        hessian_eigenvalues(model, cross_entropy_loss, batches, k=0)
    with pytest.raises(ValueError, match="method"):
        hessian_trace(model, cross_entropy_loss, batches, method="exact")
    with pytest.raises(ValueError, match="empty"):
        hessian_trace(model, cross_entropy_loss, [])
    with pytest.raises(TypeError, match="0-dim"):
        hessian_trace(model, lambda m, b: cross_entropy_loss(m, b).reshape(1, 1), batches)


def test_preconditioned_sharpness_leaves_out_parameters_adam_does_not_move():
    model, batches = _WithUnused(), mlp_batches()
    opt = _adam_after_steps(model, cross_entropy_loss, batches)
    assert not opt.state[model.extra.weight]  # never had a gradient, so no Adam state
    H = dense_hessian(model.body, cross_entropy_loss, batches)
    P = to_flat(adam_preconditioner(model.body, opt))
    D = torch.diag(P.rsqrt())
    truth = float(torch.linalg.eigvalsh(D @ H @ D)[-1])
    result = preconditioned_sharpness(model, cross_entropy_loss, batches, opt, tol=1e-8)
    assert result.value == pytest.approx(truth, rel=1e-6)


@pytest.mark.parametrize("spectrum", [[2.0] * 10, [3.0] * 5 + [-1.0] * 5, [5.0, 5.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])
def test_lanczos_finds_k_values_when_the_krylov_space_runs_out(spectrum):
    # Fewer distinct eigenvalues than k: the Krylov space is exhausted after as many steps
    # as there are distinct values, and Lanczos must restart instead of dividing by β ≈ 0.
    from sharpscope.curvature import lanczos

    diag = torch.tensor(spectrum, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(len(spectrum), len(spectrum), dtype=torch.float64,
                                        generator=torch.Generator().manual_seed(4)))[0]
    a = basis @ torch.diag(diag) @ basis.T
    like = [torch.zeros(len(spectrum), dtype=torch.float64)]
    k = 4
    result = lanczos(lambda v: [a @ v[0]], like, k, tol=1e-10, max_iter=len(spectrum))
    expected = sorted(spectrum, reverse=True)[:k]
    assert result.converged
    assert result.values == pytest.approx(expected, abs=1e-10)
    assert all(math.isfinite(r) for r in result.residuals)
