"""Live critical-sharpness monitoring inside a training loop.

    monitor = SharpnessMonitor(model, loss_fn, probe_batch, optimizer, every=10)
    for step in range(steps):
        ...
        loss.backward()
        with monitor.around_step(step):
            optimizer.step()
        if monitor.latest is not None:          # measured at this step
            log(step, monitor.latest)

Every ``every`` steps the monitor captures the optimizer's update direction
d = (θ_before − θ_after)/lr by differencing around ``step()`` and measures the critical
sharpness along d on the fixed probe batch, warm-started from the previous η_c (and the
slope of the previous loss profile), so a measurement costs a few forward passes. By
default it measures at θ_before, where d was computed (``at="after"`` measures at the new
θ along the same d and saves one parameter copy). Training state is never perturbed.

A step whose learning rate is 0 (the first steps of a warmup from zero) moves nothing and
has no direction: a measurement due there is taken at the next step with lr > 0, and its
metrics say so (``sharpness/deferred_from``: the step it was due at). The same holds for a
step that moved no parameter although lr > 0 (an accumulation micro-step of a loop that
calls ``step()`` every batch, a step a gradient scaler skipped on overflow).

With ``exact_every`` > 0 the monitor also measures exact references every that many steps,
at θ_before on the same probe batch: λ_max (Lanczos), the Hessian trace (Hutchinson) and,
for Adam-family optimizers with state, preconditioned sharpness. They cost Hessian-vector
products (tens of forward+backward passes each), so they are off by default.

``guard=`` adds a stability guard (curvature/guard.py) fed by every measurement: it logs
``stability/*`` metrics and, with ``action="cap"``, scales the learning rate of every
parameter group for the steps that follow. The scale is applied in ``begin_step`` on top
of whatever lr the scheduler set, and the scheduler's own values are put back right after
``optimizer.step()`` (a step post-hook, or ``end_step``), so a scheduler that reads its
previous lr (a chainable one) never sees the scale.

``total_steps`` (the run's length in optimizer steps, when known) adds the live
three-phase reading (signals.PhaseReader) to every measurement: ``phase/code`` (0
undecided, 1 rise, 2 decay, 3 plateau), ``phase/smoothed``, ``phase/peak``,
``phase/t_peak`` and ``phase/plateau_since``, read on η_c at t = step/total_steps.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ..tensors import vectors as vec
from ..tensors.distributed import mean_floats, resolve_group
from ..tensors.objective import LossFn, Objective, precision_of
from ..tensors.state import trainable_parameters, unwrap_model
from .capture import DirectionCapture
from .critical import CriticalSharpnessResult, search_critical_lr
from .eigen import hessian_eigenvalues
from .guard import StabilityGuard, make_guard
from ..signals import PhaseReader
from .preconditioned import preconditioned_sharpness
from .trace import hessian_trace
from ..metrics import (
    DEFERRED_FROM, DESCENT_STEP, LAMBDA_MAX, PROBE_BATCHES, LR_OVER_ETA_C, PRECONDITIONED, PRECONDITIONED_RATIO, PRECONDITIONED_THRESHOLD, TRACE, TRACE_PER_PARAM, TRACE_STDERR,
)

__all__ = ["EXACT_MEASURES", "PROBES", "SharpnessMonitor", "check_monitor_options", "exact_references"]

EXACT_MEASURES = ("lambda_max", "trace", "preconditioned")
"""The exact references the monitor can add every ``exact_every`` steps."""

PROBES = ("fixed", "step", "next")
"""Where the loss along the update is measured: the fixed probe batch given to the monitor,
the batch the step was computed on, or the next training batch (both passed to
``around_step(step, batch=...)``)."""


def _positive_int(name: str, value: Any, *, zero_ok: bool = False) -> None:
    low = 0 if zero_ok else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        what = "0 (off) or a positive integer" if zero_ok else "a positive integer"
        raise ValueError(f"{name} must be {what}, not {value!r}")


def check_monitor_options(**options: Any) -> None:
    """Raise ValueError (one line: what is wrong, what is allowed) for options that
    :class:`SharpnessMonitor` would refuse, before any model exists; the callbacks call
    this when they are constructed so a typo fails at once, not at the first step."""
    parameters = inspect.signature(SharpnessMonitor.__init__).parameters
    names = [n for n in parameters if n not in ("self", "model", "loss_fn", "probe_batch", "optimizer")]
    for name in options:
        if name not in names:
            raise ValueError(f"unknown monitor option {name!r}; the options are: {', '.join(names)}")
    o = {**{n: parameters[n].default for n in names}, **options}
    _positive_int("every", o["every"])
    _positive_int("exact_every", o["exact_every"], zero_ok=True)
    _positive_int("max_evals", o["max_evals"])
    _positive_int("lanczos_iters", o["lanczos_iters"])
    _positive_int("trace_samples", o["trace_samples"])
    if o["method"] not in ("fast", "paper"):
        raise ValueError(f"method must be 'fast' or 'paper', not {o['method']!r}")
    if isinstance(o["rtol"], bool) or not isinstance(o["rtol"], (int, float)) or not 0 < o["rtol"] < 1:
        raise ValueError(f"rtol must be a number in (0, 1), not {o['rtol']!r}")
    if o["at"] not in ("before", "after"):
        raise ValueError(f"at must be 'before' or 'after', not {o['at']!r}")
    if o["mode"] not in (None, "eval", "train"):
        raise ValueError(f"mode must be 'eval', 'train' or None (as the model is), not {o['mode']!r}")
    if o["autocast"] is not None and not isinstance(o["autocast"], torch.dtype):
        raise ValueError(f"autocast must be None (full precision) or a torch dtype such as torch.bfloat16, "
                         f"not {o['autocast']!r}")
    exact = o["exact"]
    if not isinstance(exact, (list, tuple)) or not all(m in EXACT_MEASURES for m in exact):
        raise ValueError(f"exact must be a list drawn from {', '.join(EXACT_MEASURES)}, not {exact!r}")
    if not (isinstance(o["exact_tol"], (int, float)) and o["exact_tol"] > 0):
        raise ValueError(f"exact_tol must be a positive number, not {o['exact_tol']!r}")
    if o["probe"] not in PROBES:
        raise ValueError(f"probe must be one of {', '.join(PROBES)}, not {o['probe']!r}")
    target = o["probe_target"]
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target < math.inf:
        raise ValueError(f"probe_target must be 0 (off) or a positive relative standard error such as 0.1, "
                         f"not {target!r}")
    make_guard(o["guard"])
    total = o["total_steps"]
    if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 1):
        raise ValueError(f"total_steps must be None (unknown) or the run's number of optimizer steps, not {total!r}")


def exact_references(model: torch.nn.Module, loss_fn: LossFn, batches: Any, optimizer: torch.optim.Optimizer, *,
                     measures: tuple[str, ...] | list[str] = EXACT_MEASURES, lanczos_iters: int = 20,
                     trace_samples: int = 16, tol: float = 1e-3, **options: Any) -> dict[str, float]:
    """λ_max (Lanczos), the trace (Hutchinson) and, for an Adam-family optimizer with state
    and lr > 0, preconditioned sharpness, as run-format metrics; ``measures`` picks which.
    ``options`` go to the operators (``mode``, ``autocast``, ``distributed`` ...). The one
    recipe the monitor, the callbacks and the trainer measure with."""
    out: dict[str, float] = {}
    if "lambda_max" in measures:
        eig = hessian_eigenvalues(model, loss_fn, batches, k=1, max_iter=lanczos_iters, tol=tol, **options)
        out[LAMBDA_MAX] = eig.values[0]
    if "trace" in measures:
        # Lanczos-deflated Hutchinson: the same product budget, a smaller standard error on
        # Hessians with a few dominant eigenvalues (docs/measures.md, "Trace"); it needs 4
        # products at least, so a smaller budget stays with plain Hutchinson.
        method = "deflated" if trace_samples >= 4 else "hutchinson"
        trace = hessian_trace(model, loss_fn, batches, samples=trace_samples, method=method, **options)
        out[TRACE] = trace.estimate
        out[TRACE_STDERR] = trace.stderr
        out[TRACE_PER_PARAM] = trace.per_param
    if "preconditioned" in measures:
        # The SAM family and Nexus keep Adam's moments in their base optimizer.
        adam = getattr(optimizer, "base", optimizer)
        group = adam.param_groups[0]
        lr = float(group["lr"].item() if isinstance(group["lr"], torch.Tensor) else group["lr"])
        # lr = 0 (warmup start, end of a decay to zero) has no threshold 38/lr to compare with.
        if "betas" in group and adam.state and lr > 0:
            pre = preconditioned_sharpness(model, loss_fn, batches, adam, max_iter=lanczos_iters, tol=tol,
                                           **options)
            out[PRECONDITIONED] = pre.value
            out[PRECONDITIONED_THRESHOLD] = pre.threshold
            out[PRECONDITIONED_RATIO] = pre.ratio
    return out


class SharpnessMonitor:
    """Critical sharpness every ``every`` optimizer steps on a probe batch.

    ``latest`` holds the metrics of the measurement made at the current step (None on
    steps without one): ``sharpness/critical`` (λ_c), ``sharpness/eta_c`` (η_c),
    ``sharpness/lr_over_eta_c`` (above 1: the step is past the critical lr along its own
    direction), ``sharpness/evals`` (loss evaluations), and, when ``loss_fn`` returns
    per-example losses, ``sharpness/critical_se`` (the standard error of λ_c over the
    probe's examples). ``sharpness/descent_step`` and ``sharpness/descent_probe`` are
    gᵀd/‖d‖ on the step's batch (from ``.grad``) and on the probe: a ``not_descent``
    failure with a positive ``descent_step`` is the probe's noise, not an uphill step.
    ``last`` is the last full result.

    ``probe``: "fixed" measures on ``probe_batch`` (one batch, or a list of micro-batches
    whose mean loss is the objective: a larger probe costs time, not memory); "step" and
    "next" on the ``batch`` passed to :meth:`around_step` (the step's own batch, or the
    next training batch). ``probe_target`` > 0 grows a probe of several micro-batches:
    the search starts on the first and doubles the micro-batches (warm-started) until a
    search succeeds with a relative standard error of λ_c at most the target, or all are
    used.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        probe_batch: Any,
        optimizer: torch.optim.Optimizer,
        *,
        every: int = 10,
        method: str = "fast",
        rtol: float = 1 / 16,
        at: str = "before",
        mode: str | None = "eval",
        autocast: torch.dtype | None = None,
        distributed: bool | str = "auto",
        process_group=None,
        max_evals: int = 64,
        exact_every: int = 0,
        exact: tuple[str, ...] | list[str] = EXACT_MEASURES,
        lanczos_iters: int = 20,
        trace_samples: int = 16,
        exact_tol: float = 1e-3,
        probe: str = "fixed",
        probe_target: float = 0.0,
        guard: Any = None,
        total_steps: int | None = None,
    ):
        check_monitor_options(every=every, method=method, rtol=rtol, at=at, mode=mode, autocast=autocast,
                              max_evals=max_evals, exact_every=exact_every, exact=exact,
                              lanczos_iters=lanczos_iters, trace_samples=trace_samples, exact_tol=exact_tol,
                              probe=probe, probe_target=probe_target, guard=guard, total_steps=total_steps)
        if probe == "fixed" and probe_batch is None:
            raise ValueError("probe_batch is None: give a probe batch, or probe='step'/'next' and pass each "
                             "step's batch to around_step(step, batch=...)")
        self.model = unwrap_model(model)
        self.optimizer = optimizer
        self.every = every
        self.method = method
        self.rtol = rtol
        self.at = at
        self.mode = mode
        self.max_evals = max_evals
        self.autocast = autocast
        self.exact_every = exact_every
        self.exact = tuple(exact)
        self.lanczos_iters = lanczos_iters
        self.trace_samples = trace_samples
        self.exact_tol = exact_tol
        self.probe = probe
        self.probe_target = float(probe_target)
        self.loss_fn = loss_fn
        self._options = {"mode": mode, "autocast": autocast, "distributed": distributed,
                         "process_group": process_group}
        self._group = resolve_group(distributed, process_group)
        self.objective = self._objective(probe_batch) if probe_batch is not None else None
        self._step_batch: Any = None
        self.last: CriticalSharpnessResult | None = None
        self.latest: dict[str, float] | None = None
        self.measurements = 0
        self.deferred_from: int | None = None
        """The step a measurement was due at but had lr = 0 (taken at the next lr > 0)."""
        self._capture: DirectionCapture | None = None
        self._capture_deferred_from: int | None = None
        self._capture_step: int | None = None
        self._exact_metrics: dict[str, float] | None = None
        self.guard: StabilityGuard | None = make_guard(guard)
        """The stability guard (None: no guard); its state is part of ``state_dict()``."""
        self.step_lr_scale = 1.0
        """The guard's lr scale applied to the current step (1.0 without a cap)."""
        self._scheduled_lrs: list | None = None
        self._post_hook = None
        self.total_steps = total_steps
        self.phase: PhaseReader | None = PhaseReader() if total_steps else None
        """The live three-phase reading (signals.PhaseReader), when the run's length is known."""

    def _objective(self, batches: Any) -> Objective:
        return Objective(self.model, self.loss_fn, batches, autocast=self.autocast,
                         distributed=self._options["distributed"], process_group=self._options["process_group"])

    @property
    def precision(self) -> str:
        """What the measurements compute in ("float32", "autocast bfloat16", ...)."""
        return precision_of(self.model, self.autocast)

    def settings(self) -> dict[str, Any]:
        """The monitor's settings as plain JSON types, for a run's config."""
        return {"every": self.every, "method": self.method, "rtol": self.rtol, "at": self.at,
                "mode": self.mode, "max_evals": self.max_evals,
                "autocast": None if self.autocast is None else str(self.autocast).removeprefix("torch."),
                "precision": self.precision, "exact_every": self.exact_every,
                "exact": list(self.exact) if self.exact_every else [],
                "lanczos_iters": self.lanczos_iters, "trace_samples": self.trace_samples,
                "probe": self.probe, "probe_target": self.probe_target,
                **({"guard": self.guard.settings.as_dict()} if self.guard is not None else {})}

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def exact_due(self, step: int) -> bool:
        return self.exact_every > 0 and step % self.exact_every == 0

    @contextmanager
    def around_step(self, step: int, batch: Any = None, *,
                    due: bool | None = None) -> Iterator[DirectionCapture | None]:
        """Wrap ``optimizer.step()``; measures afterwards when ``step`` is due. ``batch`` is
        the probe for ``probe="step"`` or ``"next"`` (ignored for "fixed"); ``due``
        overrides the monitor's own cadence as in :meth:`begin_step`."""
        capture = self.begin_step(step, batch=batch, due=due)
        try:
            yield capture
        except BaseException:
            self._capture = self._exact_metrics = None  # the step failed: nothing to report
            self._unscale_lr()
            raise
        self.end_step()

    def begin_step(self, step: int, *, batch: Any = None, due: bool | None = None,
                   exact_due: bool | None = None) -> DirectionCapture | None:
        """Call just before ``optimizer.step()`` (for callback APIs with separate hooks).

        ``due`` / ``exact_due`` override the monitor's own cadence (``step % every == 0``)
        for callers that count steps differently. A due step with lr = 0 is deferred to the
        next step with lr > 0. Exact references, when due, are measured here (at θ_before).
        ``batch`` is the probe for ``probe="step"`` or ``"next"``.
        """
        self.latest = None
        self._capture = None
        self._capture_deferred_from = None
        self._exact_metrics = None
        if self.guard is not None:
            self.guard.event = self.guard.message = None
        # Before the capture reads the lr: d = Δθ/lr must divide by the lr applied.
        self._scale_lr()
        due = self.due(step) if due is None else due
        exact_due = exact_due if exact_due is not None else self.exact_due(step)
        if self.probe != "fixed":
            if batch is None and (due or exact_due or self.deferred_from is not None):
                raise ValueError(f"probe={self.probe!r} measures on the batch passed to the step: call "
                                 "around_step(step, batch=...) (or begin_step(step, batch=...))")
            self._step_batch = batch
        if exact_due:
            self._exact_metrics = self.measure_exact()
        if not due and self.deferred_from is None:
            return None
        capture = DirectionCapture(self.model, self.optimizer, keep_before=self.at == "before")
        lr = capture.step_lr()
        if not (math.isfinite(lr) and lr > 0):
            if self.deferred_from is None:
                self.deferred_from = step
            return None
        self._capture = capture.__enter__()
        self._capture_step = step
        self._capture_deferred_from, self.deferred_from = self.deferred_from, None
        return capture

    def _moved(self, direction: list[torch.Tensor]) -> bool:
        """Whether the step moved any parameter, on any rank (ranks must agree: the
        measurement that follows is collective)."""
        moved = any(bool(d.any()) for d in direction)
        if self._group is not None:
            moved = mean_floats([float(moved)], self._group)[0] > 0
        return moved

    def end_step(self) -> dict[str, float] | None:
        """Call just after ``optimizer.step()``; returns the metrics of this step's
        measurements (critical sharpness and/or exact references), or None."""
        capture, self._capture = self._capture, None
        exact, self._exact_metrics = self._exact_metrics, None
        self._unscale_lr()
        metrics: dict[str, float] = {}
        if capture is not None:
            capture.__exit__(None, None, None)
            if capture.direction is not None and not self._moved(capture.direction):
                # The optimizer did not move the parameters (a micro-step of gradient
                # accumulation, a step a gradient scaler skipped on overflow): there is
                # no update to measure along, so the measurement waits for the next step
                # that moves, like a zero-lr step.
                capture.before = None
                if self.deferred_from is None:
                    self.deferred_from = (self._capture_deferred_from if self._capture_deferred_from is not None
                                          else self._capture_step)
            elif capture.direction is not None:
                metrics.update(self.measure(capture))
                if self._capture_deferred_from is not None:
                    metrics[DEFERRED_FROM] = float(self._capture_deferred_from)
        if exact:
            metrics.update(exact)
        self.latest = metrics or None
        return self.latest

    def _probe_objective(self) -> Objective:
        return self.objective if self.probe == "fixed" else self._objective(self._step_batch)

    def measure_exact(self) -> dict[str, float]:
        """The exact references (:func:`exact_references`) at the model's current
        parameters on the probe batch."""
        objective = self._probe_objective()
        return exact_references(self.model, objective.loss_fn, objective.batches, self.optimizer,
                                measures=self.exact, lanczos_iters=self.lanczos_iters,
                                trace_samples=self.trace_samples, tol=self.exact_tol, **self._options)

    def _search(self, objective: Objective, capture: DirectionCapture, warm: CriticalSharpnessResult | None,
                cold_eta: float) -> CriticalSharpnessResult:
        ok = warm is not None and warm.ok
        return search_critical_lr(
            self.model, objective, capture.direction, method=self.method, rtol=self.rtol,
            eta0=warm.eta if ok else cold_eta,
            slope0=warm.slope if ok and math.isfinite(warm.slope) else None,
            origin=capture.before if self.at == "before" else None,
            max_evals=self.max_evals, mode=self.mode,
        )

    def measure(self, capture: DirectionCapture) -> dict[str, float]:
        """Measure along a captured direction; returns (and keeps in ``latest``) the metrics."""
        objective = self._probe_objective()
        grow = self.probe_target > 0 and len(objective.batches) > 1
        used = 1 if grow else len(objective.batches)
        probe = self._objective(objective.batches[:used]) if grow else objective
        result = self._search(probe, capture, self.last, capture.lr)
        evals = result.evals
        # A failed search on a small probe is where a larger one helps most: grow then too.
        while grow and used < len(objective.batches) \
                and not (result.ok and result.stderr <= self.probe_target * result.sharpness):
            # Without per-example losses there is no standard error to aim at: all of them.
            used = len(objective.batches) if math.isnan(result.stderr) else min(2 * used, len(objective.batches))
            probe = self._objective(objective.batches[:used])
            result = self._search(probe, capture, result if result.ok else self.last, capture.lr)
            evals += result.evals
        result.evals = evals
        capture.before = None  # free the copy
        self.last = result
        self.measurements += 1
        metrics = result.as_metrics()
        metrics[LR_OVER_ETA_C] = capture.lr / result.eta if result.eta > 0 else math.nan
        if grow:
            metrics[PROBE_BATCHES] = float(used)
        descent = self._step_descent(capture.direction)
        if math.isfinite(descent):
            metrics[DESCENT_STEP] = descent
        if self.phase is not None:
            # η_c space, as the analysis reads it: an uphill update is η_c = 0, a search
            # without a reading (no_increase, max_evals) is skipped.
            eta = result.eta if result.ok else 0.0 if result.status == "not_descent" else math.nan
            step = self._capture_step if self._capture_step is not None else self.measurements
            metrics.update(self.phase.update(step / self.total_steps, eta).as_metrics())
        if self.guard is not None:
            metrics.update(self.guard.update(step=self._capture_step if self._capture_step is not None else -1,
                                             lr=capture.lr, eta=result.eta, status=result.status,
                                             eta_se=result.eta_stderr, descent_step=descent))
        self.latest = metrics
        return metrics

    # -- the guard's lr scale ----------------------------------------------------------

    def _scale_lr(self) -> None:
        """Multiply every group's lr by the guard's scale for this step (cap only; a scale
        of exactly 1 touches nothing, so warn and stop never change training)."""
        scale = self.guard.lr_scale if self.guard is not None else 1.0
        self.step_lr_scale = scale
        if scale == 1.0:
            return
        self._unscale_lr()  # a step whose end was never reported: its values first
        groups = self.optimizer.param_groups
        self._scheduled_lrs = [group["lr"] for group in groups]
        for group, lr in zip(groups, self._scheduled_lrs):
            group["lr"] = lr * scale
        if self._post_hook is None and isinstance(self.optimizer, torch.optim.Optimizer):
            # Right after step(): Lightning steps its scheduler before the callback's
            # end of batch, and a chainable scheduler must read the scheduled lr.
            self._post_hook = self.optimizer.register_step_post_hook(lambda *_: self._unscale_lr())

    def _unscale_lr(self) -> None:
        """Put the scheduler's lrs back (the very objects it set), once."""
        saved, self._scheduled_lrs = self._scheduled_lrs, None
        if saved is not None:
            for group, lr in zip(self.optimizer.param_groups, saved):
                group["lr"] = lr

    def _step_descent(self, direction: list[torch.Tensor]) -> float:
        """gᵀd/‖d‖ with g the gradient the step was computed from (``.grad``, after any
        clipping), NaN when a parameter has no gradient (an optimizer that cleared it)."""
        grads = [p.grad for p in trainable_parameters(self.model)]
        if any(g is None for g in grads):
            return math.nan
        norm = vec.norm(direction)
        return vec.dot(grads, direction) / norm if norm > 0 else math.nan

    def state_dict(self) -> dict:
        """What resume needs to continue with the same warm start (plain JSON types)."""
        last = self.last
        return {
            "measurements": self.measurements,
            "deferred_from": self.deferred_from,
            "eta": None if last is None or not math.isfinite(last.eta) else last.eta,
            "slope": None if last is None or not math.isfinite(last.slope) else last.slope,
            "status": None if last is None else last.status,
            **({"guard": self.guard.state_dict()} if self.guard is not None else {}),
            **({"phase": self.phase.state_dict()} if self.phase is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        self.measurements = int(state.get("measurements", 0))
        self.deferred_from = state.get("deferred_from")
        if self.guard is not None and state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])
        if self.phase is not None and state.get("phase") is not None:
            self.phase.load_state_dict(state["phase"])
        if state.get("status") is None:
            self.last = None
            return
        eta = state["eta"] if state.get("eta") is not None else math.nan
        slope = state["slope"] if state.get("slope") is not None else math.nan
        self.last = CriticalSharpnessResult(
            sharpness=2.0 / eta if eta and math.isfinite(eta) else math.nan,
            eta=eta, evals=0, status=state["status"], method=self.method, rtol=self.rtol,
            loss0=math.nan, slope=slope,
        )
