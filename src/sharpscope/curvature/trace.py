"""Hessian trace: Hutchinson and Hutch++ estimators, each with a standard error.

Hutchinson: for Rademacher z (entries ±1), E[zᵀAz] = tr(A); the estimate is the mean of
n samples and its standard error the sample standard deviation over √n. The same samples
give each parameter tensor's block trace tr(A_bb) = E[z_bᵀ(Az)_b] at no extra cost.

Hutch++ (Meyer, Musco, Musco & Woodruff, 2021) spends a third of its budget m on a sketch
Y = A·S, takes an orthonormal basis Q of Y, computes tr(QᵀAQ) exactly (another third)
and applies Hutchinson to the deflated remainder (I − QQᵀ)A(I − QQᵀ) with the last
third. When the spectrum is dominated by a few large eigenvalues, as Hessians of trained
networks are, the remainder's variance is far smaller. Its standard error is that of the
Hutchinson part (the deflated part is exact given Q).

"Trace sharpness" is tr(H)/P, reported as ``per_param``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..tensors import vectors as vec
from ..tensors.objective import LossFn
from .products import HessianOperator

__all__ = ["TraceResult", "hutchinson", "hutchpp", "hessian_trace"]

MatVec = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


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


def _orthonormal_basis(vectors: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    """Modified Gram–Schmidt, twice for stability; drops numerically dependent vectors."""
    basis: list[list[torch.Tensor]] = []
    for y in vectors:
        y_norm = vec.norm(y)
        for _ in range(2):
            for q in basis:
                y = vec.axpy(-vec.dot(q, y), q, y)
        n = vec.norm(y)
        if n > 1e-10 * max(y_norm, 1e-300):
            basis.append(vec.scale(y, 1.0 / n))
    return basis


def hutchpp(
    matvec: MatVec, like: Sequence[torch.Tensor], budget: int = 64, *, seed: int = 0
) -> tuple[float, float]:
    """(estimate, stderr) of the trace by Hutch++ with ``budget`` products in all."""
    if budget < 6:
        raise ValueError(f"Hutch++ needs a budget of at least 6 products, not {budget}")
    gen = torch.Generator().manual_seed(seed)
    sketch = budget // 3
    residual_samples = budget - 2 * sketch
    ys = [matvec(vec.random_like(like, gen, "rademacher")) for _ in range(sketch)]
    basis = _orthonormal_basis(ys)
    exact = math.fsum(vec.dot(q, matvec(q)) for q in basis)
    values = []
    for _ in range(residual_samples):
        z = vec.random_like(like, gen, "rademacher")
        for q in basis:
            z = vec.axpy(-vec.dot(q, z), q, z)
        values.append(vec.dot(z, matvec(z)))
    rest, se = _mean_and_stderr(values)
    return exact + rest, se


def hessian_trace(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Any,
    *,
    method: str = "hutchinson",
    samples: int = 64,
    seed: int = 0,
    product: str = "auto",
    **options,
) -> TraceResult:
    """tr(H) of the mean loss over ``batches``, with a standard error.

    ``method`` is "hutchinson" (``samples`` probes, also block traces per parameter) or
    "hutch++" (``samples`` is the total product budget). ``options`` as in
    hessian_eigenvalues. The model is left exactly as it was.
    """
    if method not in ("hutchinson", "hutch++"):
        raise ValueError(f"method must be 'hutchinson' or 'hutch++', not {method!r}")
    with HessianOperator(model, loss_fn, batches, method=product, seed=seed, **options) as op:
        names = [n for n, p in op.model.named_parameters() if p.requires_grad]
        if method == "hutchinson":
            est, se, blocks, block_errors = hutchinson(op.matvec, op.params, samples, seed=seed)
            by_parameter = dict(zip(names, blocks))
            by_parameter_stderr = dict(zip(names, block_errors))
        else:
            est, se = hutchpp(op.matvec, op.params, samples, seed=seed)
            by_parameter = by_parameter_stderr = None
        return TraceResult(
            estimate=est, stderr=se, matvecs=op.matvecs, n_params=op.dim, method=method,
            by_parameter=by_parameter, by_parameter_stderr=by_parameter_stderr,
        )
