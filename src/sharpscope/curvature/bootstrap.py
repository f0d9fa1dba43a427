"""The uncertainty of a critical-sharpness measurement, from the losses it already has.

When ``loss_fn`` returns per-example losses, every probe of the line search (and the
baseline) knows the loss of each example of the probe batch. The measured η_c is a
function of those example losses; how much it would move on another probe batch of the
same size is estimated by the bootstrap: resample the examples with replacement (the
same resample for the baseline and every probe, since the differences L(θ − ηd) − L0
are what the search reads), recompute the mean losses at the probed step sizes, and find
each replicate's crossing with the search's own rule on the probes already evaluated:

* the largest probe that decreased the replicate's loss by more than the rounding band
  and the probe just above it bracket the crossing; η_c of the replicate is where the
  line through f(η) = (L(η) − L0)/η at those two probes is zero (exact for a quadratic
  profile), kept inside the bracket;
* a replicate whose crossing lies beyond the probes is extrapolated along the line
  through the two outermost probes on that side; one that decreases at no probe and
  whose line has no positive root is uphill: η_c = 0 (λ_c = ∞), as "not_descent" is
  for the measurement itself.

No forward pass is added. The standard error is half the width of the central 68%
of the replicates (the standard deviation for a normal distribution, and defined when a
few replicates are uphill, where λ_c is infinite). Examples are the resampling unit, so
they should be independent: return one loss per sequence, not per token (tokens of one
sequence are correlated, and a bootstrap over them understates the spread).

Batches (and ranks) are strata: each is resampled within itself, because the measured
objective is the unweighted mean of the batches' means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["REPLICATES", "BootstrapSpread", "bootstrap_spread", "half_width_68"]

REPLICATES = 200
"""Bootstrap replicates per measurement: the standard error is then known to about 5%."""

# Furthest an extrapolated crossing may lie from the outermost probe (as the fast search's
# own largest step), so a replicate with an almost flat line does not produce an absurd η.
_MAX_REACH = 64.0

_LOW, _HIGH = 0.15865525393145707, 0.8413447460685429  # Φ(−1), Φ(1)


@dataclass
class BootstrapSpread:
    """Standard errors of η_c and λ_c = 2/η_c over the replicates, and the replicates."""

    eta_stderr: float
    stderr: float
    etas: np.ndarray


def half_width_68(values: np.ndarray) -> float:
    """Half the width of the central 68% of ``values`` (which may hold ±inf)."""
    with np.errstate(invalid="ignore"):  # inf − inf between infinite order statistics
        lo, hi = np.quantile(np.sort(values), [_LOW, _HIGH])
        width = 0.5 * (hi - lo)
    return float(width) if math.isfinite(width) else math.inf


def replicate_means(evaluations: Sequence[Sequence[np.ndarray]], replicates: int, seed: int) -> np.ndarray:
    """(replicates × evaluations) bootstrap means; ``evaluations[e][c]`` holds the example
    losses of batch (stratum) c at evaluation e. An evaluation with a non-finite example is
    non-finite in every replicate, as the search reads it (a rise)."""
    n_cells = len(evaluations[0])
    rng = np.random.default_rng(seed)
    out = np.zeros((replicates, len(evaluations)))
    for c in range(n_cells):
        X = np.stack([np.asarray(ev[c], dtype=np.float64) for ev in evaluations], axis=1)
        n = X.shape[0]
        weights = rng.multinomial(n, np.full(n, 1.0 / n), size=replicates) / n
        out += weights @ np.where(np.isfinite(X), X, 0.0)
    out /= n_cells
    bad = ~np.all(np.isfinite(np.stack([np.concatenate(ev) for ev in evaluations])), axis=1)
    out[:, bad] = np.inf
    return out


def _root(x1, f1, x2, f2):
    """Root of the line through (x1, f1) and (x2, f2) where it rises, else NaN (arrays)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (f2 - f1) / (x2 - x1)
        root = x1 - f1 / slope
    return np.where(np.isfinite(slope) & (slope > 0), root, np.nan)


def replicate_etas(etas: np.ndarray, changes: np.ndarray, band: float) -> np.ndarray:
    """η_c of each replicate from its loss changes L(η_p) − L0 (replicates × probes) at
    the probed step sizes ``etas`` (any order): see the module notes."""
    order = np.argsort(etas)
    x, D = etas[order], changes[:, order]
    R, P = D.shape
    with np.errstate(invalid="ignore"):
        f = np.where(np.isfinite(D), D / x, np.inf)
        decreased = D < -band
    rows = np.arange(R)
    has_lo = decreased.any(axis=1)
    lo = np.where(has_lo, P - 1 - np.argmax(decreased[:, ::-1], axis=1), -1)
    out = np.empty(R)

    inside = has_lo & (lo < P - 1)
    if inside.any():
        r, i = rows[inside], lo[inside]
        x1, x2, f1, f2 = x[i], x[i + 1], f[r, i], f[r, i + 1]
        root = _root(x1, f1, x2, f2)
        out[inside] = np.where(np.isfinite(root), np.clip(root, x1, x2), 0.5 * (x1 + x2))

    beyond = has_lo & (lo == P - 1)  # every probe up to the largest decreased the loss
    if beyond.any():
        if P >= 2:
            root = _root(x[-2], f[beyond, -2], x[-1], f[beyond, -1])
            out[beyond] = np.where(np.isfinite(root), np.clip(root, x[-1], _MAX_REACH * x[-1]), np.inf)
        else:
            out[beyond] = np.inf

    below = ~has_lo  # no probe decreased the loss: the crossing is below them, or uphill
    if below.any():
        finite = np.isfinite(f[below])
        if P >= 2:
            root = _root(x[0], f[below, 0], x[1], f[below, 1])
            ok = np.isfinite(root) & (root > 0) & finite[:, 0] & finite[:, 1]
            out[below] = np.where(ok, np.clip(root, x[0] / _MAX_REACH, x[0]), 0.0)
        else:
            out[below] = 0.0
    return out


def bootstrap_spread(
    probe_etas: Sequence[float],
    baseline: Sequence[np.ndarray],
    probes: Sequence[Sequence[np.ndarray]],
    band: float,
    *,
    replicates: int = REPLICATES,
    seed: int = 0,
) -> BootstrapSpread:
    """Bootstrap standard errors of η_c and λ_c from the example losses of the baseline
    (one array per batch) and of each probe (same layout), at step sizes ``probe_etas``.
    Deterministic for a given ``seed``; touches no global random state."""
    means = replicate_means([baseline, *probes], replicates, seed)
    changes = means[:, 1:] - means[:, :1]
    etas = replicate_etas(np.asarray(probe_etas, dtype=np.float64), changes, band)
    with np.errstate(divide="ignore"):
        sharpness = np.where(etas > 0, 2.0 / etas, np.inf)
    return BootstrapSpread(eta_stderr=half_width_68(etas), stderr=half_width_68(sharpness), etas=etas)
