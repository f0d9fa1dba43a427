"""Scaling fits of a sharpness measure against model size (numpy only).

* log-linear:  S = a * log10(N) + b, ordinary least squares on S;
* power law:   log S = c * log N + d, least squares on log S; R^2 and AIC are then measured
               on S itself so the two models are compared on the same data;
* AIC = n ln(RSS / n) + 2k with k = 2 for both;
* leave-one-out: refit without each point, relative error of its prediction;
* a prediction's 95% interval is +/- 1.96 x the standard error of the fitted mean,
  s * sqrt(1/n + (x0 - mean x)^2 / Sxx), s^2 = RSS / (n - 2).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError

Z95 = 1.96


def check_xy(n_params, values, what: str = "values", min_points: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Validate a size/value table; raise UserError naming the problem."""
    n = np.asarray(n_params, dtype=float)
    y = np.asarray(values, dtype=float)
    if n.shape != y.shape or n.ndim != 1:
        raise UserError(f"sizes and {what} must be two columns of the same length")
    if not np.all(np.isfinite(n)) or not np.all(np.isfinite(y)):
        bad = int(np.flatnonzero(~(np.isfinite(n) & np.isfinite(y)))[0])
        raise UserError(f"row {bad + 1} has a missing or non-finite value; remove it or fill it in")
    if np.any(n <= 0):
        bad = int(np.flatnonzero(n <= 0)[0])
        raise UserError(f"row {bad + 1}: model size must be positive, got {n[bad]:g}")
    if np.unique(n).size < min_points:
        raise UserError(f"need at least {min_points} distinct model sizes to fit, got {np.unique(n).size}")
    return n, y


@dataclass
class LineFit:
    """y = slope * x + intercept by ordinary least squares, with its diagnostics."""

    slope: float
    intercept: float
    r2: float
    r: float
    rss: float
    n: int
    x_mean: float
    sxx: float

    def predict(self, x) -> np.ndarray:
        return self.slope * np.asarray(x, dtype=float) + self.intercept

    def mean_stderr(self, x) -> np.ndarray:
        """Standard error of the fitted mean at x (NaN with fewer than 3 points)."""
        x = np.asarray(x, dtype=float)
        if self.n <= 2:
            return np.full_like(x, np.nan)
        s = math.sqrt(self.rss / (self.n - 2))
        return s * np.sqrt(1.0 / self.n + (x - self.x_mean) ** 2 / self.sxx)


def line_fit(x, y) -> LineFit:
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    xm, ym = x.mean(), y.mean()
    sxx = float(np.sum((x - xm) ** 2))
    if sxx == 0:
        raise UserError("all x values are equal; a fit needs at least two different ones")
    sxy = float(np.sum((x - xm) * (y - ym)))
    slope = sxy / sxx
    intercept = ym - slope * xm
    resid = y - (slope * x + intercept)
    rss = float(np.sum(resid ** 2))
    tss = float(np.sum((y - ym) ** 2))
    r2 = 1.0 - rss / tss if tss > 0 else 1.0
    syy = tss
    r = sxy / math.sqrt(sxx * syy) if syy > 0 else 0.0
    return LineFit(slope=slope, intercept=intercept, r2=r2, r=r, rss=rss, n=int(x.size), x_mean=float(xm), sxx=sxx)


def aic(rss: float, n: int, k: int = 2) -> float:
    """n ln(RSS/n) + 2k; -inf for a perfect fit."""
    if rss <= 0:
        return -math.inf
    return n * math.log(rss / n) + 2 * k


def pearson(a, b) -> float:
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    mask = np.isfinite(a) & np.isfinite(b)
    a, b = a[mask], b[mask]
    if a.size < 3 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


@dataclass
class ScalingFit:
    """Both scaling models fitted to (N, S), with leave-one-out errors."""

    n: int
    slope: float
    intercept: float
    r2: float
    r: float
    aic_loglinear: float
    power_exponent: float
    power_coef: float
    power_r2: float
    aic_power: float
    loo_mean_pct: float
    loo_max_pct: float
    power_loo_mean_pct: float
    power_loo_max_pct: float
    preferred: str

    def as_dict(self) -> dict:
        return asdict(self)


class ScalingLaw:
    """Fits S against N both ways; predicts with the log-linear model's 95% interval."""

    def __init__(self, n_params, values, what: str = "values"):
        self.n_params, self.values = check_xy(n_params, values, what)
        self.x = np.log10(self.n_params)
        self.loglinear = line_fit(self.x, self.values)
        if np.any(self.values <= 0):
            self.power = None
        else:
            self.power = line_fit(np.log(self.n_params), np.log(self.values))

    def power_predict(self, n) -> np.ndarray:
        if self.power is None:
            return np.full(np.shape(n), np.nan)
        return np.exp(self.power.predict(np.log(np.asarray(n, dtype=float))))

    def _loo(self, power: bool) -> np.ndarray:
        errors = []
        for i in range(self.values.size):
            keep = np.arange(self.values.size) != i
            if np.unique(self.x[keep]).size < 2:
                errors.append(np.nan)
                continue
            if power:
                f = line_fit(np.log(self.n_params[keep]), np.log(self.values[keep]))
                pred = math.exp(f.predict(math.log(self.n_params[i])))
            else:
                pred = float(line_fit(self.x[keep], self.values[keep]).predict(self.x[i]))
            errors.append(abs(pred - self.values[i]) / abs(self.values[i]) if self.values[i] != 0 else np.nan)
        return np.asarray(errors)

    def summary(self) -> ScalingFit:
        ll = self.loglinear
        k = self.values.size
        loo = self._loo(power=False) * 100
        if self.power is not None:
            pred = self.power_predict(self.n_params)
            rss_p = float(np.sum((self.values - pred) ** 2))
            tss = float(np.sum((self.values - self.values.mean()) ** 2))
            power_r2 = 1 - rss_p / tss if tss > 0 else 1.0
            aic_p = aic(rss_p, k)
            ploo = self._loo(power=True) * 100
            pe, pc = self.power.slope, math.exp(self.power.intercept)
        else:
            power_r2 = aic_p = pe = pc = float("nan")
            ploo = np.full(k, np.nan)
        aic_l = aic(ll.rss, k)
        preferred = "log-linear" if not (aic_p < aic_l) else "power law"
        return ScalingFit(n=k, slope=ll.slope, intercept=ll.intercept, r2=ll.r2, r=ll.r, aic_loglinear=aic_l,
                          power_exponent=pe, power_coef=pc, power_r2=power_r2, aic_power=aic_p,
                          loo_mean_pct=float(np.nanmean(loo)), loo_max_pct=float(np.nanmax(loo)),
                          power_loo_mean_pct=float(np.nanmean(ploo)) if np.isfinite(ploo).any() else float("nan"),
                          power_loo_max_pct=float(np.nanmax(ploo)) if np.isfinite(ploo).any() else float("nan"),
                          preferred=preferred)

    def predict(self, n_new) -> list[dict]:
        """Log-linear predictions with 95% intervals of the fitted mean, and the power law's."""
        n_new = np.asarray(n_new, dtype=float)
        x0 = np.log10(n_new)
        mean = self.loglinear.predict(x0)
        half = Z95 * self.loglinear.mean_stderr(x0)
        power = self.power_predict(n_new)
        return [{"n_params": float(n), "predicted": float(m), "lower": float(m - h), "upper": float(m + h),
                 "predicted_power": float(p)} for n, m, h, p in zip(n_new, mean, half, power)]
