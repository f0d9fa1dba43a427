"""Top Hessian eigenvalues: Lanczos with full reorthogonalisation; power iteration as
the baseline it is compared against.

Lanczos builds an orthonormal Krylov basis Q_m of the operator A from a random start and
the tridiagonal T_m = Q_mᵀ A Q_m; the Ritz values (eigenvalues of T_m) converge to the
extreme eigenvalues of A. Every new basis vector is orthogonalised against all earlier
ones (twice) because in floating point plain three-term Lanczos loses orthogonality and
produces ghost copies of converged eigenvalues. Memory: one parameter-sized vector per
iteration.

Stopping rule: the accuracy asked for is that of the *eigenvalue*. For a Ritz pair
(θ_i, s_i) the residual norm of the Ritz vector is r_i = |β_m·s_{m,i}|. Some eigenvalue
of A lies within r_i of θ_i, and if the nearest other eigenvalue is at distance δ_i, the
one θ_i approximates lies within r_i²/δ_i of it (the Kato–Temple / gap theorem for
symmetric operators). δ_i is estimated from the other Ritz values, each moved towards
θ_i by its own residual (an eigenvalue lies within r_j of θ_j):
δ_i ≈ min_{j≠i} (|θ_i − θ_j| − r_j). The bound is r_i²/δ_i once r_i ≤ δ_i/10 (the Ritz
vector is then within about 6° of one eigenvector, Davis–Kahan), r_i before. Lanczos
stops when the bound is at most ``tol·|θ_i|`` for each of the top k *and* those Ritz
values moved by at most ``tol·|θ_i|`` in the last step (with ``return_vectors``: when
r_i ≤ tol·|θ_i|, since a Ritz vector's accuracy is its residual). Once θ_i has separated
from its neighbours this stops after far fewer products than the residual rule
r_i ≤ tol·|θ_i| (the eigenvalue error is quadratic in the residual). The two guards
matter while the top of the spectrum is an unresolved cluster: the next eigenvalue is
then missing from the Ritz values, δ_i is overestimated, and without them a value
between λ_1 and λ_2 could pass (tested on closed-form spectra with λ_2/λ_1 up to 0.97).
No Krylov rule can see an eigenvalue the Krylov space has not found at all (a random
start makes that unlikely).

Bookkeeping: for parameters that are plain tensors on one device with one dtype the
basis is one (m × P) tensor and each Gram–Schmidt pass is two matrix-vector products
(coefficients Q·w, then w − Qᵀc); for sharded (DTensor), multi-device or mixed-dtype
parameters it is a list of per-parameter vectors, one reduction per pass (see
tensors/vectors.py). Both give the same numbers to rounding.

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

__all__ = ["EigenResult", "lanczos", "power_iteration", "hessian_eigenvalues", "DEFAULT_TOL"]

MatVec = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]

# Default bound on the relative eigenvalue error. Monitoring needs λ_max to about 1e-3;
# the bound sits 10x below that because its gap is estimated (see the module doc). On
# the bench GPT it costs 1–3 products more than stopping at 1e-3.
DEFAULT_TOL = 1e-4

# The quadratic bound r²/δ is used once r ≤ δ/SEPARATION (see eigenvalue_error_bounds).
SEPARATION = 10.0


@dataclass
class EigenResult:
    """``values`` descending (the k largest, algebraically); ``matvecs`` operator products;
    ``residuals`` the Ritz residual norms; ``vectors`` the Ritz vectors if asked for;
    ``history`` the estimate of the top eigenvalue after each product; ``error_bounds``
    the bound on each value's error that the stopping rule tested (Lanczos)."""

    values: list[float]
    matvecs: int
    residuals: list[float]
    converged: bool
    method: str
    vectors: list[list[torch.Tensor]] | None = None
    history: list[float] = field(default_factory=list)
    error_bounds: list[float] = field(default_factory=list)


def _padded(values: np.ndarray, k: int) -> np.ndarray:
    """The first k of ``values``, padded with NaN (never equal) when there are fewer."""
    out = np.full(k, np.nan)
    out[: min(k, len(values))] = values[:k]
    return out


def eigenvalue_error_bounds(ritz: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    """r_i²/δ_i for each Ritz value, δ_i the distance to the nearest other Ritz value less
    that value's residual (see the module doc), where r_i ≤ δ_i/SEPARATION; r_i elsewhere."""
    ritz = np.asarray(ritz, dtype=float)
    residuals = np.asarray(residuals, dtype=float)
    bounds = residuals.copy()
    if len(ritz) < 2:
        return bounds
    dist = np.abs(ritz[:, None] - ritz[None, :]) - residuals[None, :]
    np.fill_diagonal(dist, np.inf)
    gap = dist.min(axis=1)
    # Only once the Ritz vector is dominated by one eigenvector (sin of its angle to it
    # is at most r/δ, Davis–Kahan): before that the Ritz value can sit inside a cluster
    # the other Ritz values do not show yet, and δ is an overestimate.
    ok = residuals <= gap / SEPARATION
    bounds[ok] = residuals[ok] ** 2 / gap[ok]
    return bounds


class _ListSpace:
    """Vectors as lists of per-parameter tensors; the basis a list of them. Used for
    sharded, multi-device or mixed-dtype parameters: every sum goes through
    tensors.vectors, which reduces over ranks."""

    def __init__(self, like: Sequence[torch.Tensor]):
        self.like = list(like)
        self.basis: list[list[torch.Tensor]] = []

    def from_list(self, v):
        return list(v)

    def to_list(self, v):
        return list(v)

    def random(self, gen: torch.Generator, kind: str):
        return vec.random_like(self.like, gen, kind)

    def dot(self, a, b) -> float:
        return vec.dot(a, b)

    def axpy(self, c: float, x, y):
        return vec.axpy(c, x, y)

    def scale(self, x, c: float):
        return vec.scale(x, c)

    def __len__(self) -> int:
        return len(self.basis)

    def row(self, j: int):
        return self.basis[j]

    def append(self, v) -> None:
        self.basis.append(v)

    def project_out(self, w, passes: int = 2):
        # Classical Gram–Schmidt, twice ("twice is enough": orthogonal to working
        # precision like the modified variant). All coefficients of a pass come from one
        # reduction, which matters when every inner product is a collective.
        for _ in range(passes):
            for q, c in zip(self.basis, vec.dots_with(self.basis, w)):
                if c != 0.0:
                    w = vec.axpy(-c, q, w)
        return w

    def combine(self, coeffs) -> list[torch.Tensor]:
        v = vec.zeros_like(self.like)
        for c, q in zip(coeffs, self.basis):
            v = vec.axpy(float(c), q, v)
        return v


class _FlatSpace:
    """Vectors as one 1-D tensor; the basis the rows of one (m × P) tensor, so a
    Gram–Schmidt pass is two matrix-vector products instead of a Python loop over basis
    vectors and parameter tensors. Half-precision parameters get a float32 basis (its
    orthogonality sets the accuracy of the Ritz values); inner products are taken in
    float64, as on the list path."""

    def __init__(self, like: Sequence[torch.Tensor], device: torch.device, dtype: torch.dtype):
        self.like = list(like)
        self.dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
        self.device = device
        self.n = vec.numel(self.like)
        self._rows = torch.empty((0, self.n), device=device, dtype=self.dtype)
        self._m = 0

    def from_list(self, v) -> torch.Tensor:
        return vec.flatten(v, self.dtype)

    def to_list(self, v: torch.Tensor) -> list[torch.Tensor]:
        return vec.unflatten(v, self.like)

    def random(self, gen: torch.Generator, kind: str) -> torch.Tensor:
        # Drawn per tensor as on the list path, so both paths start from the same vector.
        return self.from_list(vec.random_like(self.like, gen, kind))

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        if a.dtype == torch.float64:
            return float(torch.dot(a, b))
        return float(torch.dot(a.double(), b.double()))

    def axpy(self, c: float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y.add(x, alpha=c)

    def scale(self, x: torch.Tensor, c: float) -> torch.Tensor:
        return x * c

    def __len__(self) -> int:
        return self._m

    def row(self, j: int) -> torch.Tensor:
        return self._rows[j]

    def append(self, v: torch.Tensor) -> None:
        if self._m == self._rows.shape[0]:
            # Grow by doubling (amortised one copy per row) rather than reserving
            # max_iter rows up front: most solves stop long before max_iter.
            grown = torch.empty((max(16, 2 * self._m), self.n), device=self.device, dtype=self.dtype)
            grown[: self._m] = self._rows[: self._m]
            self._rows = grown
        self._rows[self._m] = v
        self._m += 1

    def project_out(self, w: torch.Tensor, passes: int = 2) -> torch.Tensor:
        if self._m == 0:
            return w
        q = self._rows[: self._m]
        for _ in range(passes):
            w = torch.addmv(w, q.t(), q @ w, alpha=-1.0)
        return w

    def combine(self, coeffs) -> list[torch.Tensor]:
        c = torch.as_tensor(np.asarray(coeffs, dtype=float), device=self.device, dtype=self.dtype)
        return self.to_list(self._rows[: len(c)].t() @ c)


def krylov_space(like: Sequence[torch.Tensor], flat: bool | None = None):
    """The space Lanczos and the trace estimators work in: flat when the parameters
    allow it (``flat=None``), or forced either way (the tests compare the two)."""
    layout = vec.flat_layout(like)
    if flat is None:
        flat = layout is not None
    if flat:
        if layout is None:
            raise ValueError("a flat basis needs plain tensors on one device with one dtype")
        return _FlatSpace(like, *layout)
    return _ListSpace(like)


def lanczos_step(space, matvec: MatVec, j: int, beta_prev: float):
    """One Lanczos step from basis vector j: (α_j, the new direction orthogonal to the
    basis, its norm β_j)."""
    q = space.row(j)
    w = space.from_list(matvec(space.to_list(q)))
    alpha = space.dot(q, w)
    w = space.axpy(-alpha, q, w)
    if j > 0:
        w = space.axpy(-beta_prev, space.row(j - 1), w)
    w = space.project_out(w)
    return alpha, w, math.sqrt(max(space.dot(w, w), 0.0))


def restart_vector(space, gen: torch.Generator):
    """A random unit vector orthogonal to the basis (a new Krylov block when the space
    is exhausted)."""
    w = space.project_out(space.random(gen, "normal"))
    return space.scale(w, 1.0 / math.sqrt(space.dot(w, w)))


def lanczos(
    matvec: MatVec,
    like: Sequence[torch.Tensor],
    k: int = 1,
    *,
    tol: float = DEFAULT_TOL,
    max_iter: int = 100,
    seed: int = 0,
    which: str = "largest",
    return_vectors: bool = False,
    flat: bool | None = None,
) -> EigenResult:
    """The k largest (``which="largest"``) or smallest eigenvalues of a symmetric operator.

    Stops when each of the k values is within ``tol`` relative by the error bound of the
    module doc; with ``return_vectors`` when each Ritz residual is at most ``tol·|θ|``. ``flat`` forces the flat (True) or per-tensor (False) basis; by default
    the flat one whenever the parameters allow it.
    """
    if which not in ("largest", "smallest"):
        raise ValueError(f"which must be 'largest' or 'smallest', not {which!r}")
    dim = vec.numel(like)
    if not 1 <= k <= dim:
        raise ValueError(f"k must be between 1 and the number of parameters ({dim}), not {k}")
    max_iter = min(max(max_iter, k), dim)
    space = krylov_space(like, flat)
    gen = torch.Generator().manual_seed(seed)
    q = space.random(gen, "normal")
    space.append(space.scale(q, 1.0 / math.sqrt(space.dot(q, q))))
    alphas: list[float] = []
    betas: list[float] = []
    history: list[float] = []
    ritz = np.array([])
    resid = np.array([])
    bounds = np.array([])
    vecs_T = np.zeros((1, 1))
    previous = np.array([])
    converged = False
    top_at_restart = None
    for j in range(max_iter):
        alpha, w, beta = lanczos_step(space, matvec, j, betas[-1] if betas else 0.0)
        alphas.append(alpha)
        ritz, vecs_T = eigh_tridiagonal(np.array(alphas), np.array(betas)) if j > 0 else (
            np.array(alphas), np.ones((1, 1))
        )
        order = np.argsort(ritz)[::-1] if which == "largest" else np.argsort(ritz)
        ritz, vecs_T = ritz[order], vecs_T[:, order]
        resid = np.abs(beta * vecs_T[-1, :])
        # Asked for vectors, the residual itself is the accuracy that matters (the angle
        # to the eigenvector is about r/δ, not r²/δ): stop on it as well.
        bounds = resid if return_vectors else eigenvalue_error_bounds(ritz, resid)
        history.append(float(ritz[0]))
        scale = np.maximum(np.abs(ritz[:k]), np.finfo(float).tiny)
        invariant = beta <= 1e-10 * max(np.abs(ritz).max(), 1e-30)
        # The bound's gap comes from the other Ritz values; while the top is an unresolved
        # cluster the next eigenvalue is missing from them and the bound is optimistic,
        # but then the top Ritz values are still moving: ask that they moved by at most
        # tol in the last step too.
        settled = len(previous) >= k and np.all(np.abs(ritz[:k] - previous[:k]) <= tol * scale)
        previous = ritz
        if len(alphas) >= k and not invariant and settled and np.all(bounds[:k] <= tol * scale):
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
            betas.append(0.0)
            space.append(restart_vector(space, gen))
            continue
        betas.append(beta)
        space.append(space.scale(w, 1.0 / beta))
    n = min(k, len(ritz))
    vectors = None
    if return_vectors:
        vectors = [space.combine(vecs_T[:, i]) for i in range(n)]
    return EigenResult(
        values=[float(x) for x in ritz[:n]],
        matvecs=len(alphas),
        residuals=[float(x) for x in resid[:n]],
        converged=converged,
        method="lanczos",
        vectors=vectors,
        history=history,
        error_bounds=[float(x) for x in bounds[:n]],
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
    tol: float = DEFAULT_TOL,
    max_iter: int | None = None,
    seed: int = 0,
    which: str = "largest",
    return_vectors: bool = False,
    product: str = "auto",
    **options,
) -> EigenResult:
    """The top-k Hessian eigenvalues of the mean loss over ``batches`` (descending).

    ``method="lanczos"`` (default) or ``"power"`` (k = 1 only, largest magnitude).
    ``tol`` bounds the relative error of each eigenvalue for Lanczos (default 1e-4, see
    the module doc); for power iteration it is the relative change between products.
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
