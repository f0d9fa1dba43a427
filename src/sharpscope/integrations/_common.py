"""What both callbacks share: the monitor, moving the probe batch, and writing a run.

A callback's run directory has one row per step, in step order: the framework's own
training scalars (loss, gradient norm, lr) at the steps it logs them, merged with the
measurements made at that step. Rows are merged in memory until a later step arrives,
so a step that several hooks contribute to is still one row.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from ..curvature import SharpnessMonitor
from ..curvature.guard import LOGGER_NAME
from ..curvature.monitor import check_monitor_options
from ..runs import METRICS_FILE, RunWriter
from ..metrics import TWO_OVER_LR


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def is_main_process() -> bool:
    """Rank 0 writes the run directory (every rank measures: the probes are collective)."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def check_label(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty label such as 'scales' or 'llama-1M', not {value!r}")


class MonitorRecorder:
    """Builds the monitor on first use, keeps its measurements and writes the run.

    Options are checked here, when the callback is made, so a typo fails at once in one
    line rather than at the first optimizer step.
    """

    def __init__(self, probe_batch: Any, loss_fn, *, every: int, run_dir: str | Path | None,
                 name: str, group: str, model: str | None, framework: str, overwrite: bool,
                 monitor_options: dict[str, Any]):
        check_monitor_options(every=every, **monitor_options)
        self.probe = monitor_options.get("probe", "fixed")
        if self.probe not in ("fixed", "step"):
            raise ValueError(f"the callbacks measure on the fixed probe_batch or on the step's own batch: probe must "
                             f"be 'fixed' or 'step', not {self.probe!r}")
        if self.probe == "fixed" and probe_batch is None:
            raise ValueError("probe_batch is None: give a probe batch, or probe='step' to measure on the batches "
                             "each step was computed on")
        check_label("name", name)
        check_label("group", group)
        if model is not None:
            check_label("model", model)
        if loss_fn is None or not callable(loss_fn):
            raise ValueError("loss_fn must be a callable loss_fn(model, batch) -> 0-dim tensor")
        self.probe_batch = probe_batch
        self.loss_fn = loss_fn
        self.every = every
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.labels = {"name": name, "group": group, **({"model": model} if model else {})}
        self.framework = framework
        self.overwrite = bool(overwrite)
        self.monitor_options = monitor_options
        self.monitor: SharpnessMonitor | None = None
        self.history: list[tuple[int, dict[str, float]]] = []
        self.pending_state: dict | None = None
        self.resume_step: int | None = None
        self._writer: RunWriter | None = None
        self._row: dict[str, Any] | None = None

    def start(self, resume_step: int | None, state: dict | None) -> None:
        """At the start of each ``train()``/``fit()``: a resumed run continues from
        ``resume_step`` with the saved monitor ``state``; a new one starts cold, and refuses
        to replace a run already in ``run_dir`` unless ``overwrite``. The monitor (and the
        run writer) are built afresh at the first step, so a callback can serve several
        calls."""
        if resume_step is None and not self.overwrite and self.run_dir is not None and is_main_process():
            rows = _count_rows(self.run_dir)
            if rows:
                raise ValueError(f"run_dir '{self.run_dir}' already holds a run ({rows} rows); pass "
                                 "overwrite=True to replace it, choose another run_dir, or resume from a checkpoint")
        self.close()
        self.monitor = None
        self.resume_step = resume_step
        self.pending_state = state

    def ensure(self, model: torch.nn.Module, optimizer, total_steps: int | None = None) -> SharpnessMonitor:
        """The monitor, built at the first step; ``total_steps`` (the run's length, when the
        framework knows it) turns on the live phase reading unless the options say otherwise."""
        if self.monitor is None:
            device = next(model.parameters()).device
            # Framework wrappers (accelerate, Lightning) expose the real optimizer inside.
            inner = getattr(optimizer, "optimizer", optimizer)
            options = {"total_steps": total_steps if total_steps and total_steps > 0 else None,
                       **self.monitor_options}
            probe = to_device(self.probe_batch, device) if self.probe == "fixed" else None
            self.monitor = SharpnessMonitor(model, self.loss_fn, probe, inner, every=self.every, **options)
            if self.pending_state is not None:
                self.monitor.load_state_dict(self.pending_state)
                self.pending_state = None
            if self.run_dir is not None and is_main_process():
                n_params = sum(p.numel() for p in model.parameters())
                self._writer = RunWriter(self.run_dir, {
                    **self.labels, "n_params": n_params, "source": "measured", "framework": self.framework,
                    "monitor": self.monitor.settings()})
                # A resumed run keeps its rows up to the checkpoint; a new one starts empty.
                self._writer.truncate_after(self.resume_step if self.resume_step is not None else -1)
        return self.monitor

    def measured(self, step: int, metrics: dict[str, float], lr: float | None) -> dict[str, float]:
        """Keep a measurement made at ``step`` (run-format keys) and put it, with the lr
        of its step and 2/lr, in the step's row; returns the kept copy."""
        metrics = dict(metrics)
        self.history.append((step, metrics))
        extra = {"lr": lr, TWO_OVER_LR: 2.0 / lr} if lr and lr > 0 else {}
        self.add(step, {**extra, **metrics})
        return metrics

    def add(self, step: int, values: dict[str, Any], total_steps: int | None = None) -> None:
        """Merge ``values`` into the row of ``step``; a later step writes the earlier row."""
        if self._writer is None or not values:
            return
        if self._row is not None and self._row["step"] != step:
            self.flush()
        if self._row is None:
            self._row = {"step": step}
        self._row.update(values)
        if total_steps:
            self._row["t"] = min(1.0, step / total_steps)

    def flush(self) -> None:
        if self._writer is not None and self._row is not None:
            self._writer.log(self._row)
        self._row = None

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _count_rows(run_dir: Path) -> int:
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        return 0
    with open(metrics, "rb") as fh:
        return sum(1 for line in fh if line.strip())


def guard_event(monitor: SharpnessMonitor | None) -> str | None:
    """The guard's event at this step's measurement ("alarm", "cap", "stop" or None),
    warned once on the ``sharpscope.guard`` logger (rank 0)."""
    guard = monitor.guard if monitor is not None else None
    if guard is None or guard.event is None:
        return None
    if is_main_process():
        logging.getLogger(LOGGER_NAME).warning("guard (%s): %s", guard.settings.action, guard.message)
    return guard.event


def finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
