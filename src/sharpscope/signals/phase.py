"""The three-phase reading made live: which phase is a run in now?

The offline detector (``analysis.phases.detect_three_phase``) reads a whole trajectory:
rise to a peak, decay, plateau. While training only the past is known, so this reader
applies the same thresholds to causal statistics, updated at every measurement:

* the smoothed critical sharpness S = 2/⟨η_c⟩ over the last ``window`` measurements
  (η_c space, as every summary of a line search is taken: not_descent is η_c = 0, and
  ``no_increase`` or a missing value is skipped), trailing instead of centred;
* the peak P = max S so far, the start S0 = the first full window's S;
* **rise**: S is within ``min_drop`` of P, and P stands above S0 by ``min_rise`` of P
  (before that, or with fewer than ``min_points`` readings, the phase is undecided);
* **decay**: S has fallen at least ``min_drop`` of P below the peak, after a rise;
* **plateau**: decayed, and over the last ``plateau_window`` of the run so far
  (measured in readings, at least ``window``) S stays within ``flat_tol`` of the drop
  P − median around its median, with a linear trend inside the same band. A later rise
  out of the band (a restart, a spike) leaves the plateau.

The phase is recomputed from the history at each reading (nothing is sticky);
``plateau_since`` keeps the first t at which the current plateau began, the signal for
an early stop at the decay→plateau transition.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..metrics import PHASE_CODE, PHASE_PEAK, PHASE_PLATEAU_SINCE, PHASE_SMOOTHED, PHASE_T_PEAK

__all__ = ["PHASES", "PhaseReader", "PhaseReading"]

PHASES = ("undecided", "rise", "decay", "plateau")
"""``phase/code`` is the index into this tuple."""

SHARPNESS_PER_ETA = 2.0
"""λ_c = 2/η_c (also analysis.etaspace's: the live reader and the offline summaries agree)."""


@dataclass
class PhaseReading:
    phase: str
    smoothed: float
    peak: float
    t_peak: float
    plateau_since: float

    @property
    def code(self) -> int:
        return PHASES.index(self.phase)

    def as_metrics(self) -> dict[str, float]:
        """Run-format metrics (``phase/…``); NaN values are left out."""
        out = {PHASE_CODE: float(self.code), PHASE_SMOOTHED: self.smoothed, PHASE_PEAK: self.peak,
               PHASE_T_PEAK: self.t_peak, PHASE_PLATEAU_SINCE: self.plateau_since}
        return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}


@dataclass
class PhaseReader:
    """Feed it each measurement with :meth:`update`; it returns the current reading."""

    window: int = 5
    min_points: int = 10
    min_rise: float = 0.1
    min_drop: float = 0.25
    plateau_window: float = 0.2
    flat_tol: float = 0.25
    t: list[float] = field(default_factory=list)
    eta: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    plateau_since: float = math.nan

    def update(self, t: float, eta: float) -> PhaseReading:
        """One measurement: ``t`` the fraction of the run done (or any increasing time),
        ``eta`` the critical learning rate (0 for not_descent; NaN or inf is skipped)."""
        if math.isfinite(eta) and eta >= 0:
            self.t.append(float(t))
            self.eta.append(float(eta))
            recent = self.eta[-self.window:]
            mean = sum(recent) / len(recent)
            self.smoothed.append(SHARPNESS_PER_ETA / mean if mean > 0 else math.inf)
        reading = self._read()
        if reading.phase == "plateau":
            if math.isnan(self.plateau_since):
                self.plateau_since = reading.plateau_since
        else:
            self.plateau_since = math.nan
        reading.plateau_since = self.plateau_since
        return reading

    def _read(self) -> PhaseReading:
        n = len(self.smoothed)
        if n < max(self.min_points, self.window):
            return PhaseReading("undecided", self.smoothed[-1] if n else math.nan, math.nan, math.nan, math.nan)
        s = np.asarray(self.smoothed[self.window - 1:])  # full windows only
        t = np.asarray(self.t[self.window - 1:])
        # A window of only uphill updates reads S = ∞: cap it at the largest finite S, so
        # it counts as the sharpest reading without making the thresholds infinite.
        cap = float(s[np.isfinite(s)].max()) if np.isfinite(s).any() else 0.0
        finite = np.where(np.isfinite(s), s, cap)
        i_peak = int(np.argmax(finite))
        peak, start, now = float(finite[i_peak]), float(finite[0]), float(finite[-1])
        reading = PhaseReading("undecided", float(s[-1]), peak, float(t[i_peak]), math.nan)
        if peak <= 0 or peak - start < self.min_rise * peak:
            return reading
        if now > (1.0 - self.min_drop) * peak:
            reading.phase = "rise"
            return reading
        reading.phase = "decay"
        # The plateau window: the last plateau_window of the run so far, in readings.
        k = max(self.window, int(round(self.plateau_window * len(self.t))))
        tail, t_tail = finite[-k:], t[-k:]
        if i_peak >= len(finite) - k or tail.size < 3:
            return reading
        level = float(np.median(tail))
        band = self.flat_tol * (peak - level)
        if np.max(np.abs(tail - level)) > band:
            return reading
        span = float(t_tail[-1] - t_tail[0])
        if span > 0:
            slope = np.polyfit(t_tail, tail, 1)[0]
            if abs(slope * span) > band:
                return reading
        reading.phase = "plateau"
        reading.plateau_since = float(t_tail[0])
        return reading

    def state_dict(self) -> dict:
        return {"t": list(self.t), "eta": list(self.eta), "smoothed": list(self.smoothed),
                "plateau_since": self.plateau_since}

    def load_state_dict(self, state: dict) -> None:
        self.t, self.eta = list(state["t"]), list(state["eta"])
        self.smoothed = list(state["smoothed"])
        self.plateau_since = float(state["plateau_since"])
