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
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from ._evaluate import LossFn, Objective
from ._state import unwrap_model
from .capture import DirectionCapture
from .critical import CriticalSharpnessResult, search_critical_lr

__all__ = ["SharpnessMonitor"]


class SharpnessMonitor:
    """Critical sharpness every ``every`` optimizer steps on a fixed probe batch.

    ``latest`` holds the metrics of the measurement made at the current step (None on
    steps without one): ``sharpness/critical`` (λ_c), ``sharpness/eta_c`` (η_c),
    ``sharpness/lr_over_eta_c`` (above 1: the step is past the critical lr along its own
    direction), ``sharpness/evals`` (loss evaluations). ``last`` is the last full result.
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
    ):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer number of steps, not {every!r}")
        if at not in ("before", "after"):
            raise ValueError(f"at must be 'before' or 'after', not {at!r}")
        self.model = unwrap_model(model)
        self.optimizer = optimizer
        self.every = every
        self.method = method
        self.rtol = rtol
        self.at = at
        self.mode = mode
        self.max_evals = max_evals
        self.objective = Objective(
            self.model, loss_fn, probe_batch, autocast=autocast,
            distributed=distributed, process_group=process_group,
        )
        self.last: CriticalSharpnessResult | None = None
        self.latest: dict[str, float] | None = None
        self.measurements = 0

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @contextmanager
    def around_step(self, step: int) -> Iterator[DirectionCapture | None]:
        """Wrap ``optimizer.step()``; measures afterwards when ``step`` is due."""
        capture = self.begin_step(step)
        try:
            yield capture
        except BaseException:
            self._capture = None  # the step failed: nothing to measure
            raise
        self.end_step()

    def begin_step(self, step: int) -> DirectionCapture | None:
        """Call just before ``optimizer.step()`` (for callback APIs with separate hooks)."""
        self.latest = None
        self._capture = None
        if not self.due(step):
            return None
        capture = DirectionCapture(self.model, self.optimizer, keep_before=self.at == "before")
        self._capture = capture.__enter__()
        return capture

    def end_step(self) -> dict[str, float] | None:
        """Call just after ``optimizer.step()``; returns the metrics when a measurement ran."""
        capture, self._capture = getattr(self, "_capture", None), None
        if capture is None:
            return None
        capture.__exit__(None, None, None)
        return self.measure(capture) if capture.direction is not None else None

    def measure(self, capture: DirectionCapture) -> dict[str, float]:
        """Measure along a captured direction; returns (and keeps in ``latest``) the metrics."""
        last = self.last
        warm = last is not None and last.ok
        result = search_critical_lr(
            self.model,
            self.objective,
            capture.direction,
            method=self.method,
            rtol=self.rtol,
            eta0=last.eta if warm else capture.lr,
            slope0=last.slope if warm and math.isfinite(last.slope) else None,
            origin=capture.before if self.at == "before" else None,
            max_evals=self.max_evals,
            mode=self.mode,
        )
        capture.before = None  # free the copy
        self.last = result
        self.measurements += 1
        metrics = result.as_metrics()
        metrics["sharpness/lr_over_eta_c"] = capture.lr / result.eta if result.eta > 0 else math.nan
        self.latest = metrics
        return metrics

    def state_dict(self) -> dict:
        """What resume needs to continue with the same warm start (plain JSON types)."""
        last = self.last
        return {
            "measurements": self.measurements,
            "eta": None if last is None or not math.isfinite(last.eta) else last.eta,
            "slope": None if last is None or not math.isfinite(last.slope) else last.slope,
            "status": None if last is None else last.status,
        }

    def load_state_dict(self, state: dict) -> None:
        self.measurements = int(state.get("measurements", 0))
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
