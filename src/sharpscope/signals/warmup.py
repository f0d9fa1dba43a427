"""Curvature-aware warmup: raise the learning rate only as fast as η_c allows.

A fixed warmup ramps the lr over a number of steps chosen in advance. This controller
chooses the lr of each step from the critical learning rate η_c that the monitor
measures along the optimizer's own update (every ``every`` steps while warming up), so
the warmup is as long as the curvature needs and no longer:

    start:      lr_0 = init · c_0
    each step:  lr_s = max(init · c_s, min(c_s, growth · lr_{s-1}, target · η̄))
    end:        the first step s with lr_s = c_s; from there on the schedule applies

``c_s`` is the *ceiling*: the schedule's lr at step s if its warmup ended at s (the peak
for cosine, linear, constant and cosine_restarts; the decaying value for wsd inside its
decay). ``η̄`` is an exponential moving average of the readings in η_c space, as every
summary of a line search is taken (docs/measures.md, "Summaries of critical sharpness"):

    η̄ ← s·η̄ + (1 − s)·η_c        (s = ``smoothing``; the first reading starts η̄)

``ok`` reads its η_c; ``not_descent`` (no step size lowers the probe loss) and a step
whose loss was not finite read η_c = 0, so they pull the cap down instead of being
dropped; a search without a reading (``no_increase``: η_c beyond the search's range,
``max_evals``, ``zero_direction``) changes nothing. Before the first reading only the
growth limit applies. The lr never goes below its starting value ``init · c_s`` (a step
with lr 0 has no direction to measure along, so a cap at 0 would never lift).

At ``max_fraction`` of the run the curvature cap is lifted: a peak that the curvature
never allows would otherwise keep the run in warmup to its end; the lr then climbs at
``growth`` per step to the ceiling.

Pure arithmetic on floats: no model, no torch. The trainer feeds it and applies its lr;
``state_dict()`` is plain JSON, so a resumed run continues with the same lr and η̄.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..config import check_number, check_positive_int

__all__ = ["AutoWarmup", "WarmupSettings", "check_warmup_settings"]


@dataclass(frozen=True)
class WarmupSettings:
    """Every choice of the controller; the trainer's ``[schedule]`` has them as ``warmup_<name>``."""

    target: float = 0.5
    """Keep lr/η̄ at most this (1: up to the critical lr itself)."""
    growth: float = 1.2
    """Largest factor by which the lr may grow from one step to the next."""
    init: float = 0.01
    """The first lr as a fraction of the ceiling (also the lowest lr of the warmup)."""
    smoothing: float = 0.5
    """Weight kept from the past in the moving average of η_c (0: the latest reading)."""
    every: int = 1
    """Measure η_c every this many steps while warming up."""
    max_fraction: float = 0.25
    """The curvature cap holds until this fraction of the run; then the lr climbs freely."""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def check_warmup_settings(settings: WarmupSettings) -> None:
    """Raise ValueError (one line: what is wrong, what is allowed)."""
    check_number("warmup target", settings.target, 0, low_open=True, high_open=True,
                 what="a positive number such as 0.5")
    check_number("warmup growth", settings.growth, 1, low_open=True, high_open=True,
                 what="a number above 1 such as 1.2")
    check_number("warmup init", settings.init, 0, 1, low_open=True, what="a number in (0, 1]")
    check_number("warmup smoothing", settings.smoothing, 0, 1, high_open=True, what="a number in [0, 1)")
    check_positive_int("warmup every", settings.every)
    check_number("warmup max_fraction", settings.max_fraction, 0, 1, what="a number in [0, 1]")


class AutoWarmup:
    """The controller's state and rules (see the module docstring).

    Per step: ``lr = step_lr(step, ceiling)`` while ``active``; after the step, if it was
    measured, ``update(eta=..., status=...)``. ``end`` is the step at which warmup ended
    (the first step whose lr was the ceiling), None while warming up. ``cap`` is the
    curvature cap target·η̄ that bounded the last lr (None before any reading and after
    the cap is lifted).
    """

    def __init__(self, settings: WarmupSettings | None = None, *, total_steps: int):
        self.settings = settings if settings is not None else WarmupSettings()
        check_warmup_settings(self.settings)
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, not {total_steps!r}")
        self.total_steps = total_steps
        self.lr: float | None = None
        self.eta_mean: float | None = None
        self.readings = 0
        self.end: int | None = None
        self.cap: float | None = None

    @property
    def active(self) -> bool:
        return self.end is None

    @property
    def cap_until(self) -> float:
        """The curvature cap binds the steps before this one."""
        return self.settings.max_fraction * self.total_steps

    def due(self, step: int) -> bool:
        """Whether step ``step`` is measured for the warmup (while it lasts)."""
        return self.active and step % self.settings.every == 0

    def step_lr(self, step: int, ceiling: float) -> float:
        """The lr of step ``step`` (0-based), given the schedule's ``ceiling`` there (its lr
        if warmup ended at this step). Records it as the last lr; when it reaches the
        ceiling, warmup ends at this step."""
        if not self.active:
            raise RuntimeError(f"warmup ended at step {self.end}: the schedule sets the lr from there on")
        if not (math.isfinite(ceiling) and ceiling > 0):
            raise ValueError(f"ceiling must be a positive lr, not {ceiling!r}")
        s = self.settings
        floor = s.init * ceiling
        self.cap = None
        if self.lr is None:
            lr = floor
        else:
            lr = min(ceiling, s.growth * self.lr)
            if self.eta_mean is not None and step < self.cap_until:
                self.cap = s.target * self.eta_mean
                lr = min(lr, self.cap)
            lr = max(lr, floor)
        if lr >= ceiling:
            lr = ceiling
            self.end = step
        self.lr = lr
        return lr

    def reading(self, *, eta: float, status: str = "ok") -> float | None:
        """The η_c a measurement contributes, or None when it is no reading."""
        if status == "ok" and math.isfinite(eta) and eta > 0:
            return float(eta)
        if status in ("not_descent", "nonfinite"):
            return 0.0
        return None

    def update(self, *, eta: float, status: str = "ok") -> float | None:
        """Take one measurement (``status`` as the line search reports it; "nonfinite" for
        a step whose loss was not finite). Returns η̄ after it, or None when it was no
        reading or warmup has ended (readings after the end change nothing)."""
        if not self.active:
            return None
        value = self.reading(eta=eta, status=status)
        if value is None:
            return None
        if self.eta_mean is None:
            self.eta_mean = value
        else:
            w = self.settings.smoothing
            self.eta_mean = w * self.eta_mean + (1.0 - w) * value
        self.readings += 1
        return self.eta_mean

    # -- resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON types (floats round-trip exactly through JSON)."""
        return {"lr": self.lr, "eta_mean": self.eta_mean, "readings": self.readings, "end": self.end,
                "cap": self.cap}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def opt_float(key):
            value = state.get(key)
            return None if value is None else float(value)

        self.lr = opt_float("lr")
        self.eta_mean = opt_float("eta_mean")
        self.readings = int(state.get("readings", 0))
        end = state.get("end")
        self.end = None if end is None else int(end)
        self.cap = opt_float("cap")
