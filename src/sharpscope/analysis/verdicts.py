"""How a statistic becomes a verdict: the claim record, the plain tests and the rules.

A verdict is one of

* ``holds``          - the statistic points the claimed way and passes the stated test,
* ``does not hold``  - it points the other way and passes the same test,
* ``inconclusive``   - anything else (too few points, too much spread, no data).

Tests are deliberately plain and stated per claim: the sign of a Pearson r or of an OLS
slope with a two-sided p < 0.05, ΔAIC beyond ±2, fractions of runs beyond 2/3 or 1/3.
With five sizes a correlation needs |r| > 0.88 to pass; that is the honest power of a
small ladder and the reason many measured verdicts can be inconclusive.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import stats

HOLDS, FAILS, UNCLEAR = "holds", "does not hold", "inconclusive"
ALPHA = 0.05


@dataclass
class Claim:
    key: str
    claim: str
    """The claim as the simulated study states it."""
    statistic: str
    """What is measured, and the test."""
    value: float
    """The primary number of the statistic."""
    verdict: str
    summary: str
    """The statistic in words, with its secondary numbers."""
    p_value: float = float("nan")
    n: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def as_row(self) -> dict[str, Any]:
        return {"claim": self.key, "statement": self.claim, "statistic": self.statistic, "value": self.value,
                "p_value": self.p_value, "n": self.n, "verdict": self.verdict, "summary": self.summary}


def pearson_test(a, b) -> tuple[float, float, int]:
    """(r, two-sided p, n) on the pairs where both are finite; NaN when undefined."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    n = int(a.size)
    if n < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan"), n
    with warnings.catch_warnings():  # nearly constant input: the r is still what we report
        warnings.simplefilter("ignore")
        r, p = stats.pearsonr(a, b)
    return float(r), float(p), n


def slope_test(x, y) -> tuple[float, float, float, int]:
    """(slope, two-sided p of slope = 0, R², n) of an OLS line."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    n = int(x.size)
    if n < 3 or np.ptp(x) == 0:
        return float("nan"), float("nan"), float("nan"), n
    fit = stats.linregress(x, y)
    return float(fit.slope), float(fit.pvalue), float(fit.rvalue ** 2), n


def partial_r(a: np.ndarray, b: np.ndarray, control: np.ndarray) -> float:
    """Correlation of a and b after removing the linear effect of ``control`` from both
    (both fall with size, so the plain r mixes in their shared dependence on N)."""
    keep = np.isfinite(a) & np.isfinite(b) & np.isfinite(control)
    if keep.sum() < 4:
        return float("nan")
    X = np.column_stack([control[keep], np.ones(keep.sum())])
    ra = a[keep] - X @ np.linalg.lstsq(X, a[keep], rcond=None)[0]
    rb = b[keep] - X @ np.linalg.lstsq(X, b[keep], rcond=None)[0]
    if np.ptp(ra) == 0 or np.ptp(rb) == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def signed_verdict(value: float, p: float, expected_sign: int) -> str:
    """Holds when ``value`` has the expected sign with p < ALPHA; fails on the opposite sign
    with p < ALPHA; inconclusive otherwise."""
    if not (math.isfinite(value) and math.isfinite(p)) or p >= ALPHA or value == 0:
        return UNCLEAR
    return HOLDS if np.sign(value) == expected_sign else FAILS


def fraction_verdict(k: int, n: int) -> str:
    """Holds when at least 2/3 of n agree, fails at 1/3 or fewer; no verdict on nothing."""
    if n == 0:
        return UNCLEAR
    if k / n >= 2 / 3:
        return HOLDS
    if k / n <= 1 / 3:
        return FAILS
    return UNCLEAR


def fmt(x: float, digits: int = 3) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"


def fmt_p(p: float) -> str:
    return "p n/a" if not math.isfinite(p) else f"p = {p:.2g}"
