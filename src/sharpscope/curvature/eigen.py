"""Top Hessian eigenvalues: Lanczos with full reorthogonalisation; power iteration as
the baseline it is compared against.

Lanczos builds an orthonormal Krylov basis Q_m of the operator A from a random start and
the tridiagonal T_m = Q_mᵀ A Q_m; the Ritz values (eigenvalues of T_m) converge to the
extreme eigenvalues of A. For a Ritz pair (θ_i, s_i) the residual norm of the Ritz vector
is |β_m·s_{m,i}|; we stop when it is at most ``tol·|θ_i|`` for each of the top k. Every
new basis vector is orthogonalised against all earlier ones (twice) because in floating
point plain three-term Lanczos loses orthogonality and produces ghost copies of converged
eigenvalues. Memory: one parameter-sized vector per iteration.

Power iteration (v ← Av/‖Av‖) converges to the eigenvalue of largest *magnitude* at the
rate |λ_2/λ_1| per product; Lanczos converges much faster for the same products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal

from ..tensors import vectors as vec
from ..tensors.objective import LossFn
from .products import HessianOperator

__all__ = ["EigenResult", "lanczos", "power_iteration", "hessian_eigenvalues"]

MatVec = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


@dataclass
class EigenResult:
    """``values`` descending (the k largest, algebraically); ``matvecs`` operator products;
    ``residuals`` the Ritz residual norms; ``vectors`` the Ritz vectors if asked for;
    ``history`` the estimate of the top eigenvalue after each product."""

    values: list[float]
    matvecs: int
    residuals: list[float]
    converged: bool
    method: str
    vectors: list[list[torch.Tensor]] | None = None
    history: list[float] = field(default_factory=list)


def _padded(values: np.ndarray, k: int) -> np.ndarray:
    """The first k of ``values``, padded with NaN (never equal) when there are fewer."""
    out = np.full(k, np.nan)
    out[: min(k, len(values))] = values[:k]
    return out


def _orthogonalise(w: list[torch.Tensor], basis: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    # Classical Gram–Schmidt, twice ("twice is enough": orthogonal to working precision
    # like the modified variant). All coefficients of a pass come from one reduction,
    # which matters when every inner product is a collective (sharded parameters).
    for _ in range(2):
        for q, c in zip(basis, vec.dots_with(basis, w)):
            if c != 0.0:
                w = vec.axpy(-c, q, w)
    return w


def lanczos(
    matvec: MatVec,
    like: Sequence[torch.Tensor],
    k: int = 1,
    *,
    tol: float = 1e-5,
    max_iter: int = 100,
    seed: int = 0,
    which: str = "largest",
    return_vectors: bool = False,
) -> EigenResult:
    """The k largest (``which="largest"``) or smallest eigenvalues of a symmetric operator."""
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', not {which!r}")
    dim = vec.numel(like)
    if not 1 <= k <= dim:
        raise ValueError(f"k must be between 1 and the number of parameters ({dim}), not {k}")
    max_iter = min(max(max_iter, k), dim)
    gen = torch.Generator().manual_seed(seed)
    q = vec.random_like(like, gen, "normal")
    q = vec.scale(q, 1.0 / vec.norm(q))
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    history: list[float] = []
    ritz = np.array([])
    resid = np.array([])
    vecs_T = np.zeros((1, 1))
    converged = False
    top_at_restart = None
    for j in range(max_iter):
        w = matvec(basis[j])
        alpha = vec.dot(basis[j], w)
        alphas.append(alpha)
        w = vec.axpy(-alpha, basis[j], w)
        if j > 0:
            w = vec.axpy(-betas[-1], basis[j - 1], w)
        w = _orthogonalise(w, basis)
        beta = vec.norm(w)
        ritz, vecs_T = eigh_tridiagonal(np.array(alphas), np.array(betas)) if j > 0 else (
            np.array(alphas), np.ones((1, 1))
        )
        order = np.argsort(ritz)[::-1] if which == "largest" else np.argsort(ritz)
        ritz, vecs_T = ritz[order], vecs_T[:, order]
        resid = np.abs(beta * vecs_T[-1, :])
        history.append(float(ritz[0]))
        scale = np.maximum(np.abs(ritz[:k]), np.finfo(float).tiny)
        invariant = beta <= 1e-10 * max(np.abs(ritz).max(), 1e-30)
        if len(alphas) >= k and not invariant and np.all(resid[:k] <= tol * scale):
            converged = True
            break
        if invariant:
            # The Krylov space is exhausted: its Ritz values are exact eigenvalues, but a
            # Krylov space holds one vector per distinct eigenvalue, so multiplicities are
            # missing. Restart from a fresh random vector orthogonal to the basis
            # (decoupled: a zero off-diagonal in T) until a whole restarted block leaves
            # the top k unchanged.
            top = _padded(ritz, k)
            if len(alphas) >= k and top_at_restart is not None and np.allclose(
                top, top_at_restart, rtol=tol, atol=tol * float(np.abs(top).max())
            ):
                converged = True
                break
            if len(alphas) >= dim:
                converged = len(alphas) >= k
                break
            top_at_restart = top
        if j + 1 == max_iter:
            break
        if invariant:
            w = _orthogonalise(vec.random_like(like, gen, "normal"), basis)
            beta, w = 0.0, vec.scale(w, 1.0 / vec.norm(w))
            betas.append(beta)
            basis.append(w)
            continue
        betas.append(beta)
        basis.append(vec.scale(w, 1.0 / beta))
    n = min(k, len(ritz))
    vectors = None
    if return_vectors:
        vectors = []
        for i in range(n):
            v = vec.zeros_like(like)
            for coeff, qj in zip(vecs_T[:, i], basis):
                v = vec.axpy(float(coeff), qj, v)
            vectors.append(v)
    return EigenResult(
        values=[float(x) for x in ritz[:n]],
        matvecs=len(alphas),
        residuals=[float(x) for x in resid[:n]],
        converged=converged,
        method="lanczos",
        vectors=vectors,
        history=history,
    )


def power_iteration(
    matvec: MatVec,
    like: Sequence[torch.Tensor],
    *,
    tol: float = 1e-5,
    max_iter: int = 1000,
    seed: int = 0,
    return_vectors: bool = False,
) -> EigenResult:
    """The eigenvalue of largest magnitude by power iteration (the comparison baseline).

    Stops when the Rayleigh quotient changes by at most ``tol`` relative between products.
    """
    gen = torch.Generator().manual_seed(seed)
    v = vec.random_like(like, gen, "normal")
    v = vec.scale(v, 1.0 / vec.norm(v))
    estimate = math.nan
    history: list[float] = []
    converged = False
    matvecs = 0
    residual = math.nan
    for _ in range(max_iter):
        w = matvec(v)
        matvecs += 1
        new = vec.dot(v, w)
        history.append(new)
        residual = vec.norm(vec.axpy(-new, v, w))
        w_norm = vec.norm(w)
        if w_norm == 0.0:
            estimate, converged = 0.0, True
            break
        done = math.isfinite(estimate) and abs(new - estimate) <= tol * abs(new)
        estimate = new
        v = vec.scale(w, 1.0 / w_norm)
        if done:
            converged = True
            break
    return EigenResult(
        values=[float(estimate)],
        matvecs=matvecs,
        residuals=[float(residual)],
        converged=converged,
        method="power",
        vectors=[v] if return_vectors else None,
        history=history,
    )


def hessian_eigenvalues(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Any,
    k: int = 1,
    *,
    method: str = "lanczos",
    tol: float = 1e-5,
    max_iter: int | None = None,
    seed: int = 0,
    which: str = "largest",
    return_vectors: bool = False,
    product: str = "auto",
    **options,
) -> EigenResult:
    """The top-k Hessian eigenvalues of the mean loss over ``batches`` (descending).

    ``method="lanczos"`` (default) or ``"power"`` (k = 1 only, largest magnitude).
    ``product`` picks how H·v is formed (see HessianOperator); ``options`` are ``mode``,
    ``autocast``, ``distributed``, ``process_group``. The model is left exactly as it was.
    """
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', not {method!r}")
    if method == "power" and (k != 1 or which != "largest"):
        raise ValueError("power iteration finds one eigenvalue (k=1, largest magnitude); use lanczos")
    with HessianOperator(model, loss_fn, batches, method=product, seed=seed, **options) as op:
        if method == "lanczos":
            return lanczos(
                op.matvec, op.params, k, tol=tol, max_iter=max_iter or 100, seed=seed,
                which=which, return_vectors=return_vectors,
            )
        return power_iteration(
            op.matvec, op.params, tol=tol, max_iter=max_iter or 1000, seed=seed,
            return_vectors=return_vectors,
        )
