"""Critical sharpness: the curvature along an update direction, from forward passes only.

The critical learning rate η_c along a direction d is the smallest η > 0 with
L(θ − η·d) > L(θ) on one fixed objective; the critical sharpness is λ_c = 2/η_c. For a
quadratic loss, L(θ − ηd) = L − η·gᵀd + ½η²·dᵀHd, so η_c = 2·gᵀd/dᵀHd and
λ_c = dᵀHd/gᵀd (for d = g a weighted mean of Hessian eigenvalues, so λ_c ≤ λ_max).

Two searches with the same stopping rule (a bracket [η_lo, η_hi] verified by probes,
L(η_lo) < L0 − band ≤ L(η_hi) with the rounding band below, and 1 − η_lo/η_hi ≤ rtol):

* ``method="paper"``: the reference search. Double η from η0 while the loss does not
  increase (halve while it does) until a bracket exists, then bisect it. η_c is the
  bracket's midpoint.
* ``method="fast"``: uses the fact that f(η) = (L(θ − ηd) − L0)/η is linear in η for a
  quadratic profile, with its root at η_c. Each probe is placed where a secant on f
  predicts the root, or where it would close the bracket in one step; the bracket
  invariant is never given up, so the answer is always verified by probes. η_c is the
  linear interpolation of f between the bracketing probes (exact for a quadratic).
  A warm start (the previous result) supplies both η0 and the slope of f, which makes a
  good first prediction possible from a single probe.

A probe counts as decreased only when its loss is below L0 by more than the rounding of
L0 (a band of 16·eps·|L0|, relative at every scale). A probe within the band is "flat":
above a decreased probe it closes the bracket like an increase (η_c to rounding), but
before any decrease it does not send the search towards zero. Near η = 0 the decrease is
too small to show, so after one probe just below a first flat probe (which may sit at η_c
to rounding), both searches step up from flat probes (the paper search doubling, the fast
search by FLAT_GROWTH) until the loss falls or rises; a loss that stays flat up to eta_max
ends "no_increase".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..tensors import vectors as vec
from .bootstrap import bootstrap_spread
from ..tensors.objective import LossFn, Objective
from ..tensors.state import StateGuard, trainable_parameters, unwrap_model
from ..metrics import SHARPNESS_PREFIX

__all__ = [
    "CriticalSharpnessResult",
    "NonFiniteLossError",
    "critical_sharpness",
    "relative_critical_sharpness",
    "update_direction",
]

STATUSES = {
    "ok": "bracket found and narrowed to rtol",
    "zero_direction": "the direction is zero",
    "not_descent": (
        "the loss does not decrease beyond rounding for any step size tried: "
        "not a descent direction"
    ),
    "no_increase": "the loss does not increase for any step size tried, up to eta_max",
    "max_evals": "the evaluation budget ran out before the bracket reached rtol",
}


# Width of the rounding band, in units of eps·|L0| (see _rounding_band).
BAND_ULPS = 16.0
# Largest factor one fast-search probe may move away from the probes so far.
MAX_GROWTH = 64.0
# Factor the fast search steps up by from a flat probe (one equal to L0 up to rounding)
# while nothing has decreased yet. For a quadratic profile the decreased probes span η
# from about band/a to η_c − band/a (a = gᵀd), a ratio of about 4D/band where D is the
# depth of the well, so steps of 8 cannot pass over a well with D > 2·band. A shallower
# well cannot be measured to the default rtol anyway: the band moves the crossing down
# by band/(4D) of η_c, more than 1/8 there.
FLAT_GROWTH = 8.0


class NonFiniteLossError(ValueError):
    """The loss at the starting point is NaN or infinite: there is nothing to compare to."""


@dataclass
class CriticalSharpnessResult:
    """Outcome of one critical-sharpness search.

    ``sharpness`` is 2/η_c and ``eta`` is η_c when a bracket was found (status "ok", or
    "max_evals" with a wider bracket); otherwise both are NaN and ``message`` says why.
    ``evals`` counts loss evaluations including the baseline. ``probes`` lists every
    (η, L(θ − η·d)) in evaluation order. ``slope`` is the slope of
    f(η) = (L(θ − ηd) − L0)/η across the final bracket (½·dᵀHd for a quadratic); the
    fast search uses it to warm-start the next measurement.

    ``stderr`` and ``eta_stderr`` are the standard errors of λ_c and η_c over the probe's
    examples (a bootstrap over the example losses the probes already computed, see
    :mod:`.bootstrap`); NaN when ``loss_fn`` returns a mean instead of per-example losses,
    or when there is no bracket. ``descent`` is gᵀd/‖d‖ on the probe objective for a search
    in which no probe decreased the loss ("not_descent"), by one central difference (the
    one extra evaluation counted in ``evals``): positive means the probe's loss does fall
    along d, but too little to show at any step size tried; NaN otherwise.
    """

    sharpness: float
    eta: float
    evals: int
    status: str
    method: str
    rtol: float
    loss0: float
    bracket: tuple[float, float] = (math.nan, math.nan)
    probes: list[tuple[float, float]] = field(default_factory=list)
    slope: float = math.nan
    message: str = ""
    stderr: float = math.nan
    eta_stderr: float = math.nan
    descent: float = math.nan

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def as_metrics(self, prefix: str = SHARPNESS_PREFIX) -> dict[str, float]:
        """Run-format metrics: critical sharpness, critical lr and the evaluation count; a
        measurement without a bracket (critical sharpness null) also logs
        ``failed/<status>`` = 1, so a study can count why measurements failed."""
        out = {
            f"{prefix}critical": self.sharpness,
            f"{prefix}eta_c": self.eta,
            f"{prefix}evals": float(self.evals),
        }
        if self.status != "ok":
            out[f"{prefix}failed/{self.status}"] = 1.0
        for key, value in (("critical_se", self.stderr), ("eta_c_se", self.eta_stderr),
                           ("descent_probe", self.descent)):
            if not math.isnan(value):
                out[f"{prefix}{key}"] = value
        return out


class _Profile:
    """Loss along θ0 − η·d, with the probes recorded.

    Each probe is one of three kinds, by its loss L against L0 and ``band`` (the rounding
    of a loss of size L0):

    * decreased: L < L0 − band, a decrease that rounding cannot explain;
    * flat: |L − L0| ≤ band, equal to L0 up to rounding;
    * risen: L > L0 + band, or L not finite.

    Flat and risen probes both count as "increased" for the bracket: a flat probe above a
    decreased one marks η_c to rounding, and taking a flat probe for descent would accept a
    bracket made of noise (an uphill direction would get a finite λ_c instead of
    "not_descent"). Where no probe has decreased yet, flat and risen differ: a flat probe
    says the step is too short for the change of the loss to show (or the loss does not
    change at all), so the searches look for η_c above it, never below (see
    ``_paper_search`` and ``_fast_search``).
    """

    def __init__(self, objective: Objective, params, origin, direction, loss0: float, band: float):
        self.objective = objective
        self.params = params
        self.origin = origin
        self.direction = direction
        self.loss0 = loss0
        self.band = band
        self.probes: list[tuple[float, float]] = []
        self.baseline_examples = objective.examples
        # Per-example losses of each probe (None once any evaluation has none).
        self.examples: list | None = [] if objective.examples is not None else None
        self.extra_evals = 0

    def _loss(self, eta: float) -> float:
        """L(θ0 − η·d), the parameters set in place (a negative η steps along +d)."""
        with torch.no_grad():
            for p, o, d in zip(self.params, self.origin, self.direction):
                p.copy_(o).add_(d, alpha=-eta)
        return self.objective.value()

    def probe(self, eta: float) -> tuple[float, bool, bool]:
        """(f(η), increased, flat) with f(η) = (L(θ0 − η·d) − L0)/η, +inf for a non-finite
        loss; increased means not decreased (flat or risen)."""
        loss = self._loss(eta)
        self.probes.append((eta, loss))
        if self.examples is not None:
            if self.objective.examples is None:
                self.examples = None
            else:
                self.examples.append(self.objective.examples)
        if not math.isfinite(loss):
            return math.inf, True, False
        change = loss - self.loss0
        return change / eta, not change < -self.band, abs(change) <= self.band

    def loss_at(self, eta: float) -> float:
        """L(θ0 − η·d) outside the search's record (counted in ``evals``)."""
        self.extra_evals += 1
        return self._loss(eta)

    @property
    def evals(self) -> int:
        return len(self.probes) + 1 + self.extra_evals


def _secant_root(a: tuple[float, float], b: tuple[float, float]) -> float | None:
    """Root of the line through (η, f) points a and b, if it rises (positive slope)."""
    (x1, f1), (x2, f2) = a, b
    if not (math.isfinite(f1) and math.isfinite(f2)) or x1 == x2:
        return None
    slope = (f2 - f1) / (x2 - x1)
    if not slope > 0:
        return None
    return x1 - f1 / slope


class _Bracket:
    """Largest probed η that decreased the loss (lo) and the smallest η above it that did
    not (hi); before any decrease, hi is the smallest probe.

    Flat probes (see _Profile) below lo are left out of hi: they are steps too short for
    the decrease to show, not evidence that η_c lies below lo.
    """

    def __init__(self):
        self.below: list[tuple[float, float]] = []  # decreased probes (η, f), ascending η
        self.above: list[tuple[float, float]] = []  # flat or risen probes, ascending η
        self.flat: list[tuple[float, float]] = []  # the flat ones among them
        self.risen: list[tuple[float, float]] = []  # the risen ones among them

    def add(self, eta: float, probe: tuple) -> None:
        """``probe`` is (f, increased) or (f, increased, flat); flat defaults to False."""
        f, increased = probe[0], probe[1]
        flat = len(probe) > 2 and probe[2]
        if increased:
            self.above.append((eta, f))
            self.above.sort()
            (self.flat if flat else self.risen).append((eta, f))
            self.flat.sort()
            self.risen.sort()
        else:
            self.below.append((eta, f))
            self.below.sort()

    @property
    def lo(self) -> tuple[float, float] | None:
        return self.below[-1] if self.below else None

    def upper(self) -> list[tuple[float, float]]:
        """The increased probes above lo, ascending η (all of them while lo is None)."""
        lo = self.lo
        return self.above if lo is None else [p for p in self.above if p[0] > lo[0]]

    @property
    def hi(self) -> tuple[float, float] | None:
        upper = self.upper()
        return upper[0] if upper else None

    def closed(self, rtol: float) -> bool:
        lo, hi = self.lo, self.hi
        return lo is not None and hi is not None and 1.0 - lo[0] / hi[0] <= rtol


def _paper_search(profile, bracket, eta0, rtol, eta_min, eta_max, max_evals) -> str:
    eta = eta0
    bracket.add(eta, profile.probe(eta))
    while bracket.lo is None or bracket.hi is None:
        if bracket.lo is not None:
            # A decrease with nothing above it yet: double.
            eta = 2.0 * bracket.lo[0]
            if eta > eta_max:
                return "no_increase"
        elif not bracket.risen and len(bracket.flat) > 1:
            # Only flat probes, and halving from the first did not decrease the loss: the
            # steps are too short for the decrease (if any) to show, so the answer is not
            # below them. Double from the largest instead of halving towards zero.
            eta = 2.0 * bracket.above[-1][0]
            if eta > eta_max:
                return "no_increase"
        else:
            # The loss rose, or the one probe so far is flat (it may sit at η_c to
            # rounding): halve below the smallest probe.
            eta = 0.5 * bracket.above[0][0]
            if eta < eta_min:
                return "not_descent"
        if profile.evals >= max_evals:
            return "max_evals"
        bracket.add(eta, profile.probe(eta))
    while not bracket.closed(rtol):
        if profile.evals >= max_evals:
            return "max_evals"
        mid = 0.5 * (bracket.lo[0] + bracket.hi[0])
        bracket.add(mid, profile.probe(mid))
    return "ok"


def _predict_root(bracket: _Bracket, last: tuple[float, float], slope0: float | None) -> float | None:
    lo, upper = bracket.lo, bracket.upper()
    hi = upper[0] if upper else None
    if lo is not None and hi is not None:
        r = _secant_root(lo, hi)
        if r is None and len(bracket.below) >= 2:
            r = _secant_root(bracket.below[-2], lo)
        return r
    side = bracket.below if hi is None else upper
    finite = [p for p in side if math.isfinite(p[1])]
    if hi is None and len(finite) >= 2:
        return _secant_root(finite[-2], finite[-1])
    if lo is None and len(finite) >= 2:
        return _secant_root(finite[0], finite[1])
    if slope0 is not None and slope0 > 0 and math.isfinite(last[1]):
        # Newton step on f with the slope remembered from the previous measurement.
        return last[0] - last[1] / slope0
    return None


def _fast_search(profile, bracket, eta0, rtol, eta_min, eta_max, max_evals, slope0) -> str:
    # hi/lo <= close  <=>  1 - lo/hi <= rtol; a hair inside so rounding cannot miss it.
    close = 1.0 / (1.0 - rtol * (1.0 - 1e-9))
    eta = eta0
    stalled = 0
    while True:
        width_before = (
            math.log(bracket.hi[0] / bracket.lo[0]) if bracket.lo and bracket.hi else math.inf
        )
        f, increased, flat = profile.probe(eta)
        bracket.add(eta, (f, increased, flat))
        if bracket.closed(rtol):
            return "ok"
        lo, hi = bracket.lo, bracket.hi
        if lo is not None and hi is not None:
            width = math.log(hi[0] / lo[0])
            stalled = stalled + 1 if width > 0.5 * width_before else 0
        if profile.evals >= max_evals:
            return "max_evals"
        r = _predict_root(bracket, (eta, f), slope0)
        if lo is not None and hi is not None:
            if r is None or stalled >= 2:
                # Safeguard: a geometric bisection when the secant has no answer or stalls.
                r, stalled = math.sqrt(lo[0] * hi[0]), 0
            r = min(max(r, lo[0]), hi[0])
            if r <= lo[0] * close:
                eta = lo[0] * close
            elif r >= hi[0] / close:
                eta = hi[0] / close
            else:
                eta = r
        elif hi is None:
            # A decrease and nothing above it yet: step up to the predicted root (at most
            # MAX_GROWTH times), or quadruple when there is no prediction.
            if r is None or not r > 0:
                r = 4.0 * lo[0]
            eta = min(max(r, lo[0] * close), MAX_GROWTH * lo[0])
            if eta > eta_max:
                return "no_increase"
        elif not bracket.risen and len(bracket.flat) == 1:
            # One flat probe: it may be η_c to rounding (a warm start on a profile that
            # has not moved), so the probe that would close the bracket comes first.
            eta = hi[0] / close
        elif not bracket.risen:
            # Only flat probes, the one just below the first among them: the steps are too
            # short for the decrease (if any) to exceed rounding, so the answer is not
            # below them. Go up; f of a flat probe is rounding and predicts nothing, so by
            # a fixed factor that cannot step over a well deep enough to measure.
            eta = FLAT_GROWTH * bracket.above[-1][0]
            if eta > eta_max:
                return "no_increase"
        else:
            # Nothing decreased and the loss rose somewhere. A flat probe far below the
            # smallest rise leaves a gap a well may hide in (a long step down from a rise
            # landed in the flat region near 0): split it before going lower.
            rise = bracket.risen[0][0]
            flats = [p[0] for p in bracket.flat if p[0] < rise]
            if flats and rise / flats[-1] > FLAT_GROWTH:
                eta = math.sqrt(flats[-1] * rise)
                continue
            # Step down below the smallest probe likewise.
            if r is None or not r > 0:
                # No prediction (e.g. every probe so far rose): fall faster than halving,
                # so an uphill direction reaches "not_descent" in a few probes.
                r = 0.25 * hi[0]
            eta = max(min(r, hi[0] / close), hi[0] / MAX_GROWTH)
            if eta < eta_min:
                return "not_descent"


def _final_eta(bracket: _Bracket, method: str) -> float:
    (lo, f_lo), (hi, f_hi) = bracket.lo, bracket.hi
    # Clamped: a probe within the rounding band below L0 counts as increased with f <= 0
    # (hi is then η_c to rounding), and the line through it would land past hi; the
    # answer must stay inside the verified bracket.
    if method == "fast" and math.isfinite(f_hi) and f_hi > f_lo:
        return min(max(lo - f_lo * (hi - lo) / (f_hi - f_lo), lo), hi)
    return 0.5 * (lo + hi)


def _bracket_slope(bracket: _Bracket) -> float:
    pairs = []
    upper = bracket.upper()
    if bracket.lo and upper:
        pairs.append((bracket.lo, upper[0]))
    if len(bracket.below) >= 2:
        pairs.append((bracket.below[-2], bracket.below[-1]))
    if len(upper) >= 2:
        pairs.append((upper[0], upper[1]))
    for (x1, f1), (x2, f2) in pairs:
        if math.isfinite(f1) and math.isfinite(f2) and x2 != x1:
            slope = (f2 - f1) / (x2 - x1)
            if slope > 0:
                return slope
    return math.nan


def _probe_descent(profile: _Profile) -> float:
    """gᵀd/‖d‖ on the probe objective, for a search in which no probe decreased the loss:
    the central difference (L(θ + ηd) − L(θ − ηd))/2η, exact for a quadratic profile, at
    the smallest probe whose change is a thousand rounding bands (rounding then moves it
    by at most 0.1%), or the largest probe if none is. One evaluation more. (Where the
    loss decreased, d descends on the probe; the line through the bracket would not give
    gᵀd there, because the profile at η_c is far from its quadratic start.)"""
    finite = [(eta, loss) for eta, loss in sorted(profile.probes) if math.isfinite(loss)]
    if not finite:
        return math.nan
    shown = [p for p in finite if abs(p[1] - profile.loss0) > 1e3 * profile.band]
    eta, loss_minus = shown[0] if shown else finite[-1]
    loss_plus = profile.loss_at(-eta)
    if not math.isfinite(loss_plus):
        return math.nan
    return (loss_plus - loss_minus) / (2.0 * eta) / vec.norm(profile.direction)


def _rounding_band(loss0: float, finfo: torch.finfo) -> float:
    """How far a probe's loss may sit from L0 and still be L0 up to rounding (see _Profile).

    c·eps·|L0| with c = BAND_ULPS and eps that of the parameters' dtype: relative to L0 at
    every scale, because the rounding of a loss computed in that dtype (its last rounding,
    and the sum or mean over samples of non-negative terms) is relative to the loss,
    however small. An absolute band, such as the floor at |L0| = 1 this had before, is
    larger than every decrease once the loss is small (16·eps = 1.9e-6 in float32), and
    read ordinary descent directions as "not_descent" or moved η_c down by tens of
    percent. A band wider than rounding costs accuracy: for a well of depth D it moves
    the measured crossing down by band/(4D) of η_c, here below 1e-5 of η_c for any well
    deeper than 0.05·L0 in float32.

    The floor, c·eps·tiny (c steps of the dtype's subnormal spacing), only acts where |L0|
    is below the dtype's smallest normal number: there the spacing of representable
    losses, and so their rounding, stops shrinking with L0.
    """
    return BAND_ULPS * finfo.eps * max(abs(loss0), finfo.tiny)


def _check_options(method: str, rtol: float, eta0) -> None:
    if method not in ("fast", "paper"):
        raise ValueError(f"method must be 'fast' or 'paper', not {method!r}")
    if not (isinstance(rtol, (int, float)) and 0.0 < rtol < 1.0):
        raise ValueError(f"rtol must be a number in (0, 1), not {rtol!r}; the default is 1/16")
    if eta0 is not None and not (
        isinstance(eta0, (int, float)) and math.isfinite(eta0) and eta0 > 0
    ):
        raise ValueError(f"eta0 must be a positive finite number, not {eta0!r}")


def search_critical_lr(
    model: torch.nn.Module,
    objective: Objective,
    direction: Sequence[torch.Tensor],
    *,
    method: str = "fast",
    rtol: float = 1 / 16,
    eta0: float | None = None,
    slope0: float | None = None,
    origin: Sequence[torch.Tensor] | None = None,
    eta_max: float | None = None,
    max_evals: int = 64,
    mode: str | None = "eval",
) -> CriticalSharpnessResult:
    """The search itself, on a prepared objective; ``origin`` defaults to the current θ.

    Used by :func:`critical_sharpness` and by the monitor, which measures at the
    parameters from before the optimizer step (``origin``) while the model holds the
    parameters from after it.
    """
    _check_options(method, rtol, eta0)
    model = unwrap_model(model)
    params = trainable_parameters(model)
    direction = vec.check_aligned(direction, params, "direction")
    nan = math.nan

    def result(status, loss0=nan, profile=None, bracket=None):
        probes = [] if profile is None else profile.probes
        eta = sharp = nan
        span = (nan, nan)
        slope = stderr = eta_stderr = descent = nan
        if bracket is not None:
            if bracket.lo and bracket.hi:
                eta = _final_eta(bracket, method)
                sharp = 2.0 / eta
                span = (bracket.lo[0], bracket.hi[0])
                if profile.examples is not None:
                    spread = bootstrap_spread([e for e, _ in probes], profile.baseline_examples,
                                              profile.examples, profile.band)
                    stderr, eta_stderr = spread.stderr, spread.eta_stderr
            elif bracket.lo:
                span = (bracket.lo[0], math.inf)
            elif bracket.hi:
                span = (0.0, bracket.hi[0])
            slope = _bracket_slope(bracket)
            if bracket.lo is None:
                descent = _probe_descent(profile)
        evals = 0 if profile is None else profile.evals
        return CriticalSharpnessResult(
            sharpness=sharp, eta=eta, evals=evals, status=status, method=method, rtol=rtol,
            loss0=loss0, bracket=span, probes=probes, slope=slope, message=STATUSES[status],
            stderr=stderr, eta_stderr=eta_stderr, descent=descent,
        )

    if not vec.is_finite(direction):
        raise ValueError("direction contains NaN or infinite values")
    d_norm = vec.norm(direction)
    if d_norm == 0.0:
        return result("zero_direction")

    with StateGuard(model, mode=mode) as guard:
        origin = guard.params if origin is None else vec.check_aligned(origin, params, "origin")
        if origin is not guard.params:
            with torch.no_grad():
                for p, o in zip(params, origin):
                    p.copy_(o)
        loss0 = objective.value()
        if not math.isfinite(loss0):
            raise NonFiniteLossError(
                f"the loss at the starting parameters is {loss0}; critical sharpness needs a "
                "finite baseline (check the model, the batch and loss_fn)"
            )
        theta_norm = vec.norm(origin)
        if eta0 is None:
            # First probe moves the parameters by 1% of their norm.
            eta0 = 0.01 * max(theta_norm, 1.0) / d_norm
        # Below this the step is lost in the parameters' rounding: the probe equals θ0.
        finfo = max((torch.finfo(p.dtype) for p in params), key=lambda fi: fi.eps)
        eps = finfo.eps
        eta_min = 4.0 * eps * max(theta_norm, 1.0) / d_norm
        eta_max = eta0 * 2.0**40 if eta_max is None else float(eta_max)
        eta0 = min(max(eta0, eta_min * 2.0), eta_max)
        band = _rounding_band(loss0, finfo)
        profile = _Profile(objective, params, origin, direction, loss0, band)
        bracket = _Bracket()
        if method == "paper":
            status = _paper_search(profile, bracket, eta0, rtol, eta_min, eta_max, max_evals)
        else:
            slope0 = slope0 if slope0 is not None and math.isfinite(slope0) else None
            status = _fast_search(
                profile, bracket, eta0, rtol, eta_min, eta_max, max_evals, slope0
            )
        return result(status, loss0, profile, bracket)


def critical_sharpness(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch: Any,
    direction: Sequence[torch.Tensor],
    *,
    method: str = "fast",
    rtol: float = 1 / 16,
    eta0: float | None = None,
    warm_start: CriticalSharpnessResult | None = None,
    eta_max: float | None = None,
    max_evals: int = 64,
    mode: str | None = "eval",
    autocast: torch.dtype | None = None,
    distributed: bool | str = "auto",
    process_group=None,
    seed: int = 0,
) -> CriticalSharpnessResult:
    """Critical sharpness λ_c = 2/η_c of ``loss_fn`` on ``batch`` along ``direction``.

    Forward passes only, under ``torch.no_grad``. Probes evaluate θ − η·direction, where
    ``direction`` holds one tensor per trainable parameter in ``model.parameters()``
    order. ``batch`` is one batch, or a list of batches whose mean loss is used.
    ``warm_start`` is the previous result on a nearby θ: its η_c becomes η0 (unless given)
    and its slope seeds the first prediction of the fast search. The model is measured in
    eval mode by default (``mode="train"`` keeps dropout, with masks fixed across probes).
    Under torch.distributed every rank must call this with its shard of the batch. For a
    model sharded with fully_shard (FSDP2) the direction's tensors are DTensors sharded
    like the parameters (as :class:`DirectionCapture` returns them) or whole tensors, the
    same on every rank.

    Returns a :class:`CriticalSharpnessResult`; a zero or non-descent direction, or no
    increase up to ``eta_max``, are outcomes (``.status``), not errors. A non-finite loss
    at θ raises :class:`NonFiniteLossError`. The model is left exactly as it was.
    """
    slope0 = None
    if warm_start is not None:
        if not isinstance(warm_start, CriticalSharpnessResult):
            raise TypeError("warm_start must be a CriticalSharpnessResult from a previous call")
        if eta0 is None and math.isfinite(warm_start.eta) and warm_start.eta > 0:
            eta0 = warm_start.eta
        if math.isfinite(warm_start.slope):
            slope0 = warm_start.slope
    objective = Objective(
        unwrap_model(model), loss_fn, batch, autocast=autocast, seed=seed,
        distributed=distributed, process_group=process_group,
    )
    return search_critical_lr(
        model, objective, direction, method=method, rtol=rtol, eta0=eta0, slope0=slope0,
        eta_max=eta_max, max_evals=max_evals, mode=mode,
    )


def update_direction(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch: Any,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    mode: str | None = "eval",
    autocast: torch.dtype | None = None,
    distributed: bool | str = "auto",
    process_group=None,
    seed: int = 0,
) -> list[torch.Tensor]:
    """The update direction d of an objective at the current θ (a step is θ − lr·d).

    Without an optimizer, d is the gradient of the mean loss over ``batch``. With one, d
    is what ``optimizer.step()`` would do with that gradient, divided by its reference lr
    (see :class:`DirectionCapture`):
    the step is taken, differenced and undone, and the optimizer's state, the parameters
    and the gradients are restored exactly. Works with any ``torch.optim`` optimizer.
    """
    from .capture import DirectionCapture  # local: capture imports this module's siblings
    from ..tensors.state import OptimizerStateGuard

    model = unwrap_model(model)
    params = trainable_parameters(model)
    objective = Objective(
        model, loss_fn, batch, autocast=autocast, seed=seed,
        distributed=distributed, process_group=process_group,
    )
    with StateGuard(model, mode=mode):
        grads = objective.gradient(params)
        if optimizer is None:
            return grads
        for p, g in zip(params, grads):
            p.grad = g.clone()
        with OptimizerStateGuard(optimizer):
            with DirectionCapture(params, optimizer=optimizer) as capture:
                optimizer.step()
        return capture.direction


def relative_critical_sharpness(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batch: Any,
    direction_loss_fn: LossFn,
    direction_batch: Any,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    **options,
) -> CriticalSharpnessResult:
    """Relative critical sharpness λ_c^{1→2}: the loss of objective 1 (``loss_fn`` on
    ``batch``) along the update direction of objective 2 (``direction_loss_fn`` on
    ``direction_batch``, through ``optimizer`` if given, else its gradient).

    A low value means a step on objective 2 stays inside objective 1's basin, e.g. a
    fine-tuning step that does not leave the pretraining minimum. ``options`` are those of
    :func:`critical_sharpness`.
    """
    shared = {k: options[k] for k in ("mode", "autocast", "distributed", "process_group", "seed") if k in options}
    direction = update_direction(model, direction_loss_fn, direction_batch, optimizer, **shared)
    return critical_sharpness(model, loss_fn, batch, direction, **options)
