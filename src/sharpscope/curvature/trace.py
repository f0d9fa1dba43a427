"""Hessian trace: Hutchinson, Hutch++ and Lanczos-deflated Hutchinson, each with a
standard error.

Hutchinson: for Rademacher z (entries ±1), E[zᵀAz] = tr(A); the estimate is the mean of
n samples and its standard error the sample standard deviation over √n. The same samples
give each parameter tensor's block trace tr(A_bb) = E[z_bᵀ(Az)_b] at no extra cost. Its
variance, 2(‖A‖_F² − Σ A_ii²) per sample, is dominated by the few large eigenvalues of
a trained network's Hessian.

Hutch++ (Meyer, Musco, Musco & Woodruff, 2021) spends a third of its budget m on a sketch
Y = A·S, takes an orthonormal basis Q of Y, computes tr(QᵀAQ) exactly (another third)
and applies Hutchinson to the deflated remainder (I − QQᵀ)A(I − QQᵀ) with the last
third. Its standard error is that of the Hutchinson part (the deflated part is exact
given Q).

Lanczos-deflated Hutchinson (``method="deflated"``) takes the deflation space from
Lanczos instead: m_L Lanczos steps give an orthonormal Krylov basis Q (m_L vectors for
m_L products) *and* tr(QᵀAQ) = Σ α_j, the diagonal of the tridiagonal T = QᵀAQ, with no
further product. Hutch++ pays two products per basis vector and its basis is one
randomized range-finder pass, which captures the top eigenvectors only roughly; a
Krylov space of the same size captures them far better (the same reason Lanczos beats
power iteration). Given Q the remainder estimate is Hutchinson on (I − QQᵀ)A(I − QQᵀ)
with the probes projected, unbiased, and its standard error is the only error.

"Trace sharpness" is tr(H)/P, reported as ``per_param``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..tensors import vectors as vec
from ..tensors.objective import LossFn
from .eigen import krylov_space, lanczos_step, restart_vector
from .products import HessianOperator

__all__ = ["TraceResult", "hutchinson", "hutchpp", "deflated_hutchinson", "hessian_trace"]

MatVec = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]

TRACE_METHODS = ("hutchinson", "hutch++", "deflated")


@dataclass
class TraceResult:
    """``estimate`` of tr(H) with ``stderr``; ``per_param`` = estimate / ``n_params``;
    ``by_parameter`` block traces per parameter name, with ``by_parameter_stderr`` their
    standard errors (Hutchinson only)."""

    estimate: float
    stderr: float
    matvecs: int
    n_params: int
    method: str
    by_parameter: dict[str, float] | None = None
    by_parameter_stderr: dict[str, float] | None = None

    @property
    def per_param(self) -> float:
        return self.estimate / self.n_params


def _mean_and_stderr(samples: list[float]) -> tuple[float, float]:
    n = len(samples)
    mean = math.fsum(samples) / n
    if n < 2:
        return mean, math.inf
    var = math.fsum((s - mean) ** 2 for s in samples) / (n - 1)
    return mean, math.sqrt(var / n)


def hutchinson(
    matvec: MatVec, like: Sequence[torch.Tensor], samples: int = 64, *, seed: int = 0
) -> tuple[float, float, list[float], list[float]]:
    """(estimate, stderr, per-tensor block traces, their standard errors) from
    ``samples`` Rademacher probes."""
    if samples < 2:
        raise ValueError(f"samples must be at least 2 for a standard error, not {samples}")
    gen = torch.Generator().manual_seed(seed)
    values: list[float] = []
    per_block: list[list[float]] = [[] for _ in like]
    for _ in range(samples):
        z = vec.random_like(like, gen, "rademacher")
        az = matvec(z)
        parts = vec.dots(z, az)
        values.append(math.fsum(parts))
        for acc, part in zip(per_block, parts):
            acc.append(part)
    est, se = _mean_and_stderr(values)
    blocks = [_mean_and_stderr(b) for b in per_block]
    return est, se, [m for m, _ in blocks], [e for _, e in blocks]


def _remainder_samples(space, matvec: MatVec, gen: torch.Generator, samples: int) -> list[float]:
    """zᵀAz for Rademacher z projected off the space's basis: Hutchinson on the deflated
    (I − QQᵀ)A(I − QQᵀ)."""
    values = []
    for _ in range(samples):
        z = space.project_out(space.random(gen, "rademacher"))
        values.append(space.dot(z, space.from_list(matvec(space.to_list(z)))))
    return values


def hutchpp(
    matvec: MatVec, like: Sequence[torch.Tensor], budget: int = 64, *, seed: int = 0,
    flat: bool | None = None,
) -> tuple[float, float]:
    """(estimate, stderr) of the trace by Hutch++ with ``budget`` products in all."""
    if budget < 6:
        raise ValueError(f"Hutch++ needs a budget of at least 6 products, not {budget}")
    gen = torch.Generator().manual_seed(seed)
    sketch = budget // 3
    residual_samples = budget - 2 * sketch
    space = krylov_space(like, flat)
    ys = [space.from_list(matvec(vec.random_like(like, gen, "rademacher"))) for _ in range(sketch)]
    for y in ys:
        # Gram–Schmidt twice for stability; numerically dependent vectors are dropped.
        y_norm = math.sqrt(space.dot(y, y))
        y = space.project_out(y)
        n = math.sqrt(space.dot(y, y))
        if n > 1e-10 * max(y_norm, 1e-300):
            space.append(space.scale(y, 1.0 / n))
    exact = math.fsum(
        space.dot(space.row(j), space.from_list(matvec(space.to_list(space.row(j))))) for j in range(len(space))
    )
    rest, se = _mean_and_stderr(_remainder_samples(space, matvec, gen, residual_samples))
    return exact + rest, se


def deflated_hutchinson(
    matvec: MatVec, like: Sequence[torch.Tensor], budget: int = 64, *, seed: int = 0,
    deflate: int | None = None, flat: bool | None = None,
) -> tuple[float, float, int]:
    """(estimate, stderr, products used) of the trace: ``deflate`` Lanczos steps (default
    half the budget) give the basis Q and tr(QᵀAQ) = Σα exactly, the remaining products
    Hutchinson samples of the deflated remainder. Fewer products are used only when the
    Krylov space fills the whole space (the trace is then exact, stderr 0)."""
    if budget < 4:
        raise ValueError(f"deflated Hutchinson needs a budget of at least 4 products, not {budget}")
    steps = budget // 2 if deflate is None else deflate
    if not 1 <= steps <= budget - 2:
        raise ValueError(f"deflate must leave at least 2 of the {budget} products to the remainder, not {steps}")
    dim = vec.numel(like)
    steps = min(steps, dim)
    space = krylov_space(like, flat)
    gen = torch.Generator().manual_seed(seed)
    q = space.random(gen, "normal")
    space.append(space.scale(q, 1.0 / math.sqrt(space.dot(q, q))))
    alphas: list[float] = []
    beta = 0.0
    size = 0.0
    for j in range(steps):
        alpha, w, beta = lanczos_step(space, matvec, j, beta)
        alphas.append(alpha)
        size = max(size, abs(alpha), beta)
        if len(space) == dim or j + 1 == steps:
            break
        if beta <= 1e-10 * max(size, 1e-30):
            # Invariant subspace: continue from a fresh vector orthogonal to the basis
            # (its α is still a diagonal entry of QᵀAQ).
            space.append(restart_vector(space, gen))
            beta = 0.0
        else:
            space.append(space.scale(w, 1.0 / beta))
    exact = math.fsum(alphas)
    if len(space) == dim:
        return exact, 0.0, len(alphas)
    rest, se = _mean_and_stderr(_remainder_samples(space, matvec, gen, budget - len(alphas)))
    return exact + rest, se, budget


def hessian_trace(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Any,
    *,
    method: str = "hutchinson",
    samples: int = 64,
    seed: int = 0,
    product: str = "auto",
    deflate: int | None = None,
    **options,
) -> TraceResult:
    """tr(H) of the mean loss over ``batches``, with a standard error.

    ``method`` is "hutchinson" (``samples`` probes, also block traces per parameter),
    "hutch++" or "deflated" (Lanczos-deflated Hutchinson; ``deflate`` Lanczos steps,
    default samples // 2); for the last two ``samples`` is the total product budget.
    "deflated" reaches a given standard error with the fewest products on Hessians
    with a few dominant eigenvalues (see docs/measures.md). ``options`` as in
    hessian_eigenvalues. The model is left exactly as it was.
    """
    if method not in TRACE_METHODS:
        raise ValueError(f"method must be one of {', '.join(TRACE_METHODS)}, not {method!r}")
    with HessianOperator(model, loss_fn, batches, method=product, seed=seed, **options) as op:
        names = [n for n, p in op.model.named_parameters() if p.requires_grad]
        by_parameter = by_parameter_stderr = None
        if method == "hutchinson":
            est, se, blocks, block_errors = hutchinson(op.matvec, op.params, samples, seed=seed)
            by_parameter = dict(zip(names, blocks))
            by_parameter_stderr = dict(zip(names, block_errors))
        elif method == "hutch++":
            est, se = hutchpp(op.matvec, op.params, samples, seed=seed)
        else:
            est, se, _ = deflated_hutchinson(op.matvec, op.params, samples, seed=seed, deflate=deflate)
        return TraceResult(
            estimate=est, stderr=se, matvecs=op.matvecs, n_params=op.dim, method=method,
            by_parameter=by_parameter, by_parameter_stderr=by_parameter_stderr,
        )
