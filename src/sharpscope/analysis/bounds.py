"""PAC-Bayes generalisation bound driven by sharpness (numpy only).

As written in the simulated study:  B(S, N, m) = sqrt((S ln N + ln(m / delta)) / m).

The study's own table does not follow it: its three columns equal sqrt(S / m),
sqrt(ln N) and their product, which is the equation with delta = m (the ln(m/delta) term
vanishes) and the square root split into two factors. We report the equation with an explicit
delta and, beside it and labelled as such, the source's variant.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError


def pac_bayes_bound(sharpness, n_params, m: float = 1e5, delta: float = 0.05) -> np.ndarray:
    s = np.asarray(sharpness, dtype=float)
    n = np.asarray(n_params, dtype=float)
    if not m > 0 or not 0 < delta < 1:
        raise UserError(f"PAC-Bayes needs m > 0 and 0 < delta < 1, got m={m}, delta={delta}")
    if np.any(n <= 1):
        raise UserError("PAC-Bayes needs model sizes above 1 parameter")
    return np.sqrt((s * np.log(n) + np.log(m / delta)) / m)


def source_variant(sharpness, n_params, m: float = 1e5) -> dict[str, np.ndarray]:
    """The columns of the source's table: sqrt(S/m), sqrt(ln N) and their product."""
    s = np.asarray(sharpness, dtype=float)
    n = np.asarray(n_params, dtype=float)
    sharp_term = np.sqrt(s / m)
    size_term = np.sqrt(np.log(n))
    return {"sqrt_s_over_m": sharp_term, "sqrt_ln_n": size_term, "source_bound": sharp_term * size_term}
