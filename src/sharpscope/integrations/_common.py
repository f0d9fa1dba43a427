"""What both callbacks share: the monitor, moving the probe batch, and writing a run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..curvature import SharpnessMonitor
from ..runs import RunWriter


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class MonitorRecorder:
    """Builds the monitor on first use and records its measurements (optionally as a run)."""

    def __init__(self, probe_batch: Any, loss_fn, *, every: int, run_dir: str | Path | None,
                 name: str, monitor_options: dict[str, Any]):
        self.probe_batch = probe_batch
        self.loss_fn = loss_fn
        self.every = every
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.name = name
        self.monitor_options = monitor_options
        self.monitor: SharpnessMonitor | None = None
        self.history: list[tuple[int, dict[str, float]]] = []
        self._writer: RunWriter | None = None

    def ensure(self, model: torch.nn.Module, optimizer) -> SharpnessMonitor:
        if self.monitor is None:
            device = next(model.parameters()).device
            # Framework wrappers (accelerate, Lightning) expose the real optimizer inside.
            inner = getattr(optimizer, "optimizer", optimizer)
            self.monitor = SharpnessMonitor(model, self.loss_fn, to_device(self.probe_batch, device), inner,
                                            every=self.every, **self.monitor_options)
            if self.run_dir is not None:
                n_params = sum(p.numel() for p in model.parameters())
                self._writer = RunWriter(self.run_dir, {"name": self.name, "group": "training",
                                                        "n_params": n_params, "source": "measured"})
        return self.monitor

    def record(self, step: int, metrics: dict[str, float] | None, lr: float | None, total_steps: int | None,
               extra: dict[str, float] | None = None) -> None:
        row: dict[str, Any] = {}
        if metrics:
            self.history.append((step, metrics))
            row.update(metrics)
            if lr:
                row["lr"] = lr
                row["sharpness/two_over_lr"] = 2.0 / lr
        if extra:
            row.update(extra)
        if self._writer is not None and row:
            row = {"step": step, **({"t": step / total_steps} if total_steps else {}), **row}
            self._writer.log(row)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}
