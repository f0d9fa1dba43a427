"""A stability guard on the stream of critical-sharpness measurements.

The monitor measures η_c, the critical learning rate along the optimizer's own update,
every N steps. One measurement is noisy (a probe batch, a line search), and its
reciprocal λ_c = 2/η_c explodes when the update is barely downhill on the probe, so the
guard smooths in η_c space, as the analysis does (docs/measures.md, "Summaries of
critical sharpness"):

    η̄ ← s·η̄ + (1 − s)·η_c                 (s = ``smoothing``; the first reading starts η̄)
    Var(η̄) ← s²·Var(η̄) + (1 − s)²·se²      (se = the measurement's bootstrap error of η_c)
    ratio = lr / η̄,   lower = lr / (η̄ + z·√Var(η̄))   (z = ``confidence``)

``lr`` is the learning rate the measured step actually used. An update that is uphill on
the probe (``not_descent``) reads η_c = 0: it pulls η̄ down, it is never dropped. When the
step's own batch says the update descends (``descent_step`` > 0) the probe was noisy, and
``noisy_probe="skip"`` leaves such a reading out. A search that found no increase up to
its η_max, ran out of evaluations or had no direction is no reading either. A missing
reading changes nothing: a run of consecutive measurements above the threshold is
neither broken nor extended by it.

The ratio is judged by ``lower`` (by ``ratio`` itself when z = 0 or no standard errors
are known): above ``threshold`` for ``patience`` consecutive readings raises the alarm,
and the action follows:

* ``warn``: the alarm is logged (``stability/alarm`` = 1) and a line written; the run is
  not touched (the lr scale stays exactly 1 and nothing is applied to the optimizer);
* ``cap``: the lr scale is multiplied by ``cap_factor · min(1, threshold/ratio)``, at
  least ``min_scale`` in all: the smoothed ratio at the capped lr becomes at most
  ``cap_factor · threshold``. The streak starts again, so a further cut needs
  ``patience`` more readings above. Every reading judged at or below the threshold
  multiplies the scale by ``recovery`` (up to 1). The default, 1, never recovers: under
  Adam the ratio comes back to about where it was as the curvature adapts to the new lr,
  so a recovered lr brings the instability back (docs/guard.md, "What the bench
  measured");
* ``stop``: the guard asks the caller to end the run.

Pure arithmetic on floats: no model, no torch. The monitor feeds it (``guard=``) and
applies the scale to every parameter group on top of the scheduler's lr; the trainer and
the callbacks act on its events. ``state_dict()`` is plain JSON, so a resumed run
continues with the same η̄, streak and scale.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..config import check_number, check_positive_int
from ..metrics import (STABILITY_ALARM, STABILITY_LR_SCALE, STABILITY_RATIO, STABILITY_RATIO_LOWER,
                       STABILITY_STOP)

__all__ = ["ACTIONS", "LOGGER_NAME", "NOISY_PROBE", "GuardSettings", "StabilityGuard", "check_guard_settings",
           "make_guard"]

ACTIONS = ("off", "warn", "cap", "stop")
"""What the guard does at an alarm ("off": no guard)."""

NOISY_PROBE = ("skip", "zero")
"""A ``not_descent`` reading whose update descends on its own batch: left out, or η_c = 0."""

LOGGER_NAME = "sharpscope.guard"
"""The ``logging`` logger the callbacks (and the trainer without a progress bar) warn on."""


@dataclass(frozen=True)
class GuardSettings:
    """Every choice of the guard; the trainer's ``[guard]`` section has the same fields."""

    action: str = "warn"
    """"warn", "cap", "stop" (or "off")."""
    threshold: float = 1.0
    """Alarm when the smoothed lr/η_c stays above this (1: the step is past its own
    critical lr)."""
    patience: int = 2
    """Consecutive readings above the threshold before the alarm."""
    smoothing: float = 0.8
    """Weight kept from the past in the moving average of η_c (0: no smoothing; 0.8 warned
    of the most loss spikes per false alarm in bench/bench_guard.py)."""
    confidence: float = 1.0
    """z: judge lr/(η̄ + z·se(η̄)), so a ratio must be above the threshold by z standard
    errors of η̄ (0: judge the ratio itself; readings without errors count as exact)."""
    cap_factor: float = 0.5
    """cap: each alarm scales the lr by cap_factor·min(1, threshold/ratio)."""
    recovery: float = 1.0
    """cap: each reading at or below the threshold multiplies the scale by this (up to 1;
    1: a cut is kept, which ended runs lower than 1.1 did in bench/bench_guard.py)."""
    min_scale: float = 0.01
    """cap: the scale never goes below this."""
    noisy_probe: str = "skip"
    """A not_descent reading with descent_step > 0 (the probe's noise): "skip" it or read
    it as η_c = 0 ("zero")."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_guard_settings(settings: GuardSettings) -> None:
    """Raise ValueError (one line: what is wrong, what is allowed)."""
    if settings.action not in ACTIONS:
        raise ValueError(f"guard action must be one of {', '.join(ACTIONS)}, not {settings.action!r}")
    check_number("guard threshold", settings.threshold, 0, low_open=True, what="a positive number such as 1.0")
    check_positive_int("guard patience", settings.patience)
    check_number("guard smoothing", settings.smoothing, 0, 1, high_open=True, what="a number in [0, 1)")
    check_number("guard confidence", settings.confidence, 0, what="a number >= 0 (standard errors)")
    check_number("guard cap_factor", settings.cap_factor, 0, 1, low_open=True, high_open=True,
                 what="a number in (0, 1)")
    check_number("guard recovery", settings.recovery, 1, what="a number >= 1 (1: never recover)")
    check_number("guard min_scale", settings.min_scale, 0, 1, low_open=True, what="a number in (0, 1]")
    if settings.noisy_probe not in NOISY_PROBE:
        raise ValueError(f"guard noisy_probe must be one of {', '.join(NOISY_PROBE)}, not {settings.noisy_probe!r}")


def make_guard(guard: Any) -> StabilityGuard | None:
    """The monitor's ``guard=``: None (no guard), an action name ("warn", "cap", "stop"),
    a dict of :class:`GuardSettings` fields, a :class:`GuardSettings` or a
    :class:`StabilityGuard`. An "off" action is no guard. Raises ValueError in one line."""
    if guard is None or isinstance(guard, StabilityGuard):
        return guard
    if isinstance(guard, str):
        settings = GuardSettings(action=guard)
    elif isinstance(guard, dict):
        names = [f.name for f in dataclasses.fields(GuardSettings)]
        for key in guard:
            if key not in names:
                raise ValueError(f"unknown guard option {key!r}; the options are: {', '.join(names)}")
        settings = GuardSettings(**guard)
    elif isinstance(guard, GuardSettings):
        settings = guard
    else:
        raise ValueError(f"guard must be None, an action ({', '.join(ACTIONS[1:])}), a dict of guard options "
                         f"or a GuardSettings, not {guard!r}")
    check_guard_settings(settings)
    return None if settings.action == "off" else StabilityGuard(settings)


class StabilityGuard:
    """The guard's state and its update rule (see the module docstring).

    ``update(...)`` takes one measurement and returns its ``stability/*`` metrics;
    afterwards ``event`` is None or what happened at this reading ("alarm": an alarm
    began under ``warn``; "cap": the lr scale was cut; "stop": the run should end) and
    ``message`` is a one-line description of it. ``lr_scale`` is the factor the next
    steps' learning rates get (exactly 1.0 unless the action is ``cap``).
    """

    def __init__(self, settings: GuardSettings | None = None):
        self.settings = settings if settings is not None else GuardSettings()
        check_guard_settings(self.settings)
        self.eta_mean: float | None = None
        self.eta_var = 0.0
        self.above = 0
        self.alarm = False
        self.lr_scale = 1.0
        self.stopped = False
        self.readings = 0
        self.alarms = 0
        self.cuts = 0
        self.event: str | None = None
        self.message: str | None = None

    # -- the update rule ---------------------------------------------------------------

    def reading(self, *, eta: float, status: str = "ok", descent_step: float = math.nan,
                eta_se: float = math.nan) -> tuple[float, float] | None:
        """(η_c, its standard error, NaN when unknown) that a measurement contributes, or
        None when it is no reading."""
        if status == "ok" and math.isfinite(eta) and eta > 0:
            return eta, eta_se
        if status == "not_descent":
            if descent_step > 0 and self.settings.noisy_probe == "skip":
                return None
            return 0.0, math.nan
        return None

    def ratios(self, lr: float) -> tuple[float, float]:
        """(lr/η̄, lr/(η̄ + z·se(η̄))) at learning rate ``lr``; NaN before any reading."""
        if self.eta_mean is None:
            return math.nan, math.nan
        ratio = lr / self.eta_mean if self.eta_mean > 0 else math.inf
        upper = self.eta_mean + self.settings.confidence * math.sqrt(self.eta_var)
        lower = lr / upper if upper > 0 else math.inf
        return ratio, lower

    def update(self, *, step: int, lr: float, eta: float, status: str = "ok", eta_se: float = math.nan,
               descent_step: float = math.nan) -> dict[str, float]:
        """Take the measurement made at ``step`` (the caller's count; kept for callers that
        record it) along an update of learning rate ``lr`` (the lr applied, scale included)
        and act; returns the ``stability/*`` metrics."""
        s = self.settings
        self.event = self.message = None
        read = self.reading(eta=eta, status=status, descent_step=descent_step, eta_se=eta_se)
        if read is not None:
            value, se = read
            var = se * se if math.isfinite(se) else 0.0
            if self.eta_mean is None:
                self.eta_mean, self.eta_var = value, var
            else:
                w = 1.0 - s.smoothing
                self.eta_mean = s.smoothing * self.eta_mean + w * value
                self.eta_var = s.smoothing * s.smoothing * self.eta_var + w * w * var
            self.readings += 1
        ratio, lower = self.ratios(lr)
        judged = lower if s.confidence > 0 else ratio
        stop = False
        if read is not None:
            self.above = self.above + 1 if judged > s.threshold else 0
            was = self.alarm
            self.alarm = self.above >= s.patience
            if self.alarm:
                what = (f"stability/ratio (lr/η_c smoothed) {ratio:.3g} above {s.threshold:g} for "
                        f"{self.above} measurements")
                if not was:
                    self.alarms += 1
                if s.action == "cap":
                    cut = s.cap_factor * min(1.0, s.threshold / ratio)
                    old = self.lr_scale
                    self.lr_scale = max(s.min_scale, old * cut)
                    self.above = 0
                    self.cuts += 1
                    self.event = "cap"
                    self.message = f"{what}: lr scale {old:.3g} -> {self.lr_scale:.3g}"
                elif s.action == "stop":
                    self.stopped = stop = True
                    self.event = "stop"
                    self.message = f"{what}: stopping the run"
                elif not was:
                    self.event = "alarm"
                    self.message = what
            elif s.action == "cap" and self.lr_scale < 1.0 and judged <= s.threshold:
                self.lr_scale = min(1.0, self.lr_scale * s.recovery)
        out = {STABILITY_RATIO: ratio}
        if s.confidence > 0:
            out[STABILITY_RATIO_LOWER] = lower
        out[STABILITY_ALARM] = 1.0 if self.alarm else 0.0
        if s.action == "cap":
            out[STABILITY_LR_SCALE] = self.lr_scale
        if stop:
            out[STABILITY_STOP] = 1.0
        return out

    # -- resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON types (floats round-trip exactly through JSON)."""
        return {"eta_mean": self.eta_mean, "eta_var": self.eta_var, "above": self.above, "alarm": self.alarm,
                "lr_scale": self.lr_scale, "stopped": self.stopped, "readings": self.readings,
                "alarms": self.alarms, "cuts": self.cuts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mean = state.get("eta_mean")
        self.eta_mean = None if mean is None else float(mean)
        self.eta_var = float(state.get("eta_var", 0.0))
        self.above = int(state.get("above", 0))
        self.alarm = bool(state.get("alarm", False))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.stopped = bool(state.get("stopped", False))
        self.readings = int(state.get("readings", 0))
        self.alarms = int(state.get("alarms", 0))
        self.cuts = int(state.get("cuts", 0))
        self.event = self.message = None
