"""The exact references' solvers: Lanczos' eigenvalue-accuracy stopping rule, the flat
Krylov basis against the per-tensor one, and the trace estimators, against closed-form
spectra and dense float64 Hessians (tests/support/dense_reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from support.dense_reference import cross_entropy_loss, dense_hessian, mlp_batches, tiny_mlp, tiny_transformer, token_batches
from sharpscope.curvature import HessianOperator, hessian_eigenvalues, hessian_trace, lanczos
from sharpscope.curvature.eigen import DEFAULT_TOL, eigenvalue_error_bounds
from sharpscope.curvature.trace import deflated_hutchinson, hutchpp


def diagonal_operator(spectrum, shapes=((6, 5), (7,), (3, 4))):
    """A symmetric operator with the given spectrum acting on a vector of several tensors
    (a random rotation of diag(spectrum), so no basis vector is special)."""
    diag = torch.as_tensor(spectrum, dtype=torch.float64)
    n = diag.numel()
    assert n == sum(math.prod(s) for s in shapes)
    rot = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(11)))[0]
    a = rot @ torch.diag(diag) @ rot.T
    like = [torch.zeros(s, dtype=torch.float64) for s in shapes]

    def matvec(v):
        flat = torch.cat([x.reshape(-1) for x in v])
        out = a @ flat
        return [part.view(x.shape) for part, x in zip(torch.split(out, [x.numel() for x in like]), like)]

    return matvec, like, a


def spectrum_with_gap(top, ratio, n=49, seed=0):
    """λ₁ = top, λ₂ = ratio·top, the rest spread below λ₂ (a few negative)."""
    rng = np.random.default_rng(seed)
    rest = np.sort(rng.uniform(-0.1 * top, 0.9 * ratio * top, n - 2))[::-1]
    return [top, ratio * top, *rest]


@pytest.mark.parametrize("ratio", [0.3, 0.7, 0.9, 0.97])
@pytest.mark.parametrize("tol", [1e-2, 1e-3, 1e-4, 1e-6])
def test_stopping_rule_meets_the_asked_eigenvalue_accuracy(ratio, tol):
    spectrum = spectrum_with_gap(5.0, ratio)
    matvec, like, _ = diagonal_operator(spectrum)
    for seed in range(4):
        result = lanczos(matvec, like, 1, tol=tol, seed=seed)
        assert result.converged
        err = abs(result.values[0] - spectrum[0])
        assert err <= tol * spectrum[0]
        # The bound it stopped on holds, and is what it reports.
        assert err <= result.error_bounds[0] * (1 + 1e-6) + 1e-14
        assert result.error_bounds[0] <= tol * abs(result.values[0])


def test_stopping_rule_needs_fewer_products_than_the_residual_rule():
    spectrum = spectrum_with_gap(5.0, 0.7)
    matvec, like, _ = diagonal_operator(spectrum)
    eig = lanczos(matvec, like, 1, tol=1e-6)
    # return_vectors stops on the residual itself (r ≤ tol·|θ|).
    resid = lanczos(matvec, like, 1, tol=1e-6, return_vectors=True)
    assert abs(eig.values[0] - spectrum[0]) <= 1e-6 * spectrum[0]
    assert resid.residuals[0] <= 1e-6 * abs(resid.values[0])
    assert eig.matvecs < resid.matvecs


def test_top_k_with_the_stopping_rule():
    spectrum = spectrum_with_gap(5.0, 0.8)
    matvec, like, _ = diagonal_operator(spectrum)
    truth = sorted(spectrum, reverse=True)[:3]
    result = lanczos(matvec, like, 3, tol=1e-5)
    assert result.converged
    for got, want in zip(result.values, truth):
        assert abs(got - want) <= 1e-5 * abs(want)
    low = lanczos(matvec, like, 2, tol=1e-5, which="smallest")
    for got, want in zip(low.values, sorted(spectrum)[:2]):
        assert abs(got - want) <= 1e-5 * abs(got)


def test_error_bound_formula():
    ritz = np.array([10.0, 8.0, 1.0])
    resid = np.array([0.1, 0.5, 3.0])
    bounds = eigenvalue_error_bounds(ritz, resid)
    # θ₁: δ = 2 − r₂ = 1.5 and r₁ ≤ δ/10, so r₁²/δ; θ₂: δ = min(2 − 0.1, 7 − 3) = 1.9 but
    # r₂ > δ/10, so r₂; θ₃: r₃ alone likewise.
    assert bounds == pytest.approx([0.01 / 1.5, 0.5, 3.0])
    assert eigenvalue_error_bounds(ritz, np.array([0.1, 0.01, 0.05])) == pytest.approx(
        [0.01 / 1.99, 0.01**2 / 1.9, 0.05**2 / 6.99])
    # No positive gap estimate: the residual alone.
    assert eigenvalue_error_bounds(np.array([1.0, 0.9]), np.array([0.2, 0.2])) == pytest.approx([0.2, 0.2])
    assert eigenvalue_error_bounds(np.array([3.0]), np.array([0.5])) == pytest.approx([0.5])


@pytest.mark.parametrize("k,which,vectors", [(1, "largest", False), (3, "largest", True), (2, "smallest", False)])
def test_flat_basis_equals_the_per_tensor_basis(k, which, vectors):
    matvec, like, _ = diagonal_operator(spectrum_with_gap(5.0, 0.9))
    flat = lanczos(matvec, like, k, tol=1e-8, which=which, return_vectors=vectors, flat=True)
    listed = lanczos(matvec, like, k, tol=1e-8, which=which, return_vectors=vectors, flat=False)
    assert flat.matvecs == listed.matvecs
    assert flat.values == pytest.approx(listed.values, rel=1e-12)
    assert flat.history == pytest.approx(listed.history, rel=1e-12)
    if vectors:
        for u, w in zip(flat.vectors, listed.vectors):
            for a, b in zip(u, w):
                assert a.shape == b.shape and a.dtype == b.dtype
                assert torch.allclose(a, b, atol=1e-10)


def test_flat_basis_equals_the_per_tensor_basis_on_a_transformer():
    model, batches = tiny_transformer(), token_batches(count=2)
    with HessianOperator(model, cross_entropy_loss, batches) as op:
        flat = lanczos(op.matvec, op.params, 2, tol=1e-8, flat=True)
        listed = lanczos(op.matvec, op.params, 2, tol=1e-8, flat=False)
    assert flat.matvecs == listed.matvecs
    assert flat.values == pytest.approx(listed.values, rel=1e-10)


def test_float32_flat_basis_is_accurate():
    model, batches = tiny_transformer(), token_batches(count=2)
    truth = float(torch.linalg.eigvalsh(dense_hessian(model, cross_entropy_loss, batches))[-1])
    result = hessian_eigenvalues(model.float(), cross_entropy_loss, batches)
    assert abs(result.values[0] - truth) <= 1e-3 * abs(truth)


def test_default_tolerance_is_within_monitoring_accuracy_of_dense_truth():
    for model, batches in ((tiny_mlp(), mlp_batches(count=2)), (tiny_transformer(), token_batches(count=2))):
        H = dense_hessian(model, cross_entropy_loss, batches)
        truth = float(torch.linalg.eigvalsh(H)[-1])
        result = hessian_eigenvalues(model, cross_entropy_loss, batches)
        assert result.converged
        assert abs(result.values[0] - truth) <= DEFAULT_TOL * abs(truth)


def test_mixed_dtypes_use_the_per_tensor_basis():
    matvec, like, _ = diagonal_operator(spectrum_with_gap(5.0, 0.5))
    mixed = [like[0], like[1].float(), like[2]]

    def mixed_matvec(v):
        out = matvec([x.double() for x in v])
        return [o.to(x.dtype) for o, x in zip(out, mixed)]

    with pytest.raises(ValueError, match="flat basis"):
        lanczos(mixed_matvec, mixed, 1, flat=True)
    result = lanczos(mixed_matvec, mixed, 1, tol=1e-4)
    assert abs(result.values[0] - 5.0) <= 1e-4 * 5.0


# ---- trace ------------------------------------------------------------------------------

def test_deflated_trace_is_exact_when_the_krylov_space_fills_the_space():
    spectrum = spectrum_with_gap(5.0, 0.5)
    matvec, like, a = diagonal_operator(spectrum)
    est, se, used = deflated_hutchinson(matvec, like, 120, deflate=len(spectrum))
    assert est == pytest.approx(float(torch.trace(a)), rel=1e-10)
    assert se == 0.0 and used == len(spectrum)


def test_deflated_trace_is_unbiased_and_its_stderr_honest():
    # A few dominant eigenvalues over a bulk, as in trained networks' Hessians.
    rng = np.random.default_rng(3)
    spectrum = [40.0, 25.0, 12.0, 6.0, *rng.uniform(-0.5, 1.5, 45)]
    matvec, like, a = diagonal_operator(spectrum)
    truth = float(torch.trace(a))
    runs = [deflated_hutchinson(matvec, like, 16, seed=s) for s in range(200)]
    estimates = np.array([r[0] for r in runs])
    stderrs = np.array([r[1] for r in runs])
    spread = estimates.std(ddof=1)
    # Unbiased: the mean of 200 runs within 4 standard errors of that mean.
    assert abs(estimates.mean() - truth) <= 4 * spread / math.sqrt(len(runs))
    # The reported standard error matches the spread over seeds (within sampling noise).
    assert 0.6 <= float(np.sqrt((stderrs**2).mean())) / spread <= 1.5
    # And it is smaller than Hutch++'s at the same budget on this spectrum.
    hpp = np.array([hutchpp(matvec, like, 15, seed=s)[0] for s in range(200)])
    assert spread < hpp.std(ddof=1)


@pytest.mark.parametrize("make", [lambda: (tiny_mlp(), mlp_batches(count=2)),
                                  lambda: (tiny_transformer(), token_batches(count=2))])
def test_deflated_trace_within_three_standard_errors_of_dense(make):
    model, batches = make()
    truth = float(torch.trace(dense_hessian(model, cross_entropy_loss, batches)))
    result = hessian_trace(model, cross_entropy_loss, batches, method="deflated", samples=40, seed=2)
    assert result.method == "deflated" and result.matvecs == 40
    assert result.stderr > 0
    assert abs(result.estimate - truth) <= 3 * result.stderr


def test_hutchpp_flat_equals_per_tensor():
    matvec, like, _ = diagonal_operator(spectrum_with_gap(5.0, 0.5))
    flat = hutchpp(matvec, like, 18, seed=4, flat=True)
    listed = hutchpp(matvec, like, 18, seed=4, flat=False)
    assert flat == pytest.approx(listed, rel=1e-10)
    dflat = deflated_hutchinson(matvec, like, 18, seed=4, flat=True)
    dlist = deflated_hutchinson(matvec, like, 18, seed=4, flat=False)
    assert dflat == pytest.approx(dlist, rel=1e-10)


def test_deflated_options_are_checked():
    matvec, like, _ = diagonal_operator(spectrum_with_gap(5.0, 0.5))
    with pytest.raises(ValueError, match="budget"):
        deflated_hutchinson(matvec, like, 3)
    with pytest.raises(ValueError, match="deflate"):
        deflated_hutchinson(matvec, like, 10, deflate=9)
    model, batches = tiny_mlp(), mlp_batches()
    with pytest.raises(ValueError, match="method"):
        hessian_trace(model, cross_entropy_loss, batches, method="xtrace")
