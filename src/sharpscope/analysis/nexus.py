"""The Nexus diagnostics' numbers (pure Python, no torch): the cross-source gradient cosines
a run logged as ``grad_cosine/*`` rows, as series over training and as early/late means."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MEAN", "EARLY", "LATE", "grad_cosine_series", "window_means"]

MEAN = "mean"
"""Key of the mean over sources (or pairs) in every per-source mapping and series."""
EARLY, LATE = 1 / 3, 2 / 3
"""Gradient cosine 'early' = evaluations with 0 < t ≤ 1/3, 'late' = t > 2/3 (t = step / steps)."""


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def grad_cosine_series(rows: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """The run's grad_cosine/* rows as series (step, t, one list per pair and the mean)."""
    rows = [r for r in rows if "grad_cosine/mean" in r]
    keys = sorted({k.removeprefix("grad_cosine/") for r in rows for k in r if k.startswith("grad_cosine/")})
    series: dict[str, Any] = {"step": [int(r["step"]) for r in rows], "t": [r["step"] / steps for r in rows]}
    for key in keys:
        series[key] = [r.get(f"grad_cosine/{key}") for r in rows]
    return series


def window_means(series: dict[str, Any], key: str) -> tuple[float, float]:
    t, values = series["t"], series.get(key, [])
    early = [v for s, v in zip(t, values) if 0 < s <= EARLY]
    late = [v for s, v in zip(t, values) if s > LATE]
    return _mean(early), _mean(late)
