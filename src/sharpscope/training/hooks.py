"""What the trainer does after each optimizer step: an ordered list of hooks.

A hook is called as ``hook(trainer, step, row)`` on every rank, after the update (or the
skip) of one step: ``step`` is the :class:`StepResult`, ``row`` the metrics row being
built for it (``step``, ``t`` and ``tokens`` to start with; a row that gets nothing more
is not written). ``Trainer.step_hooks`` starts as ``STEP_HOOKS``; a new measurement or
action (a stability guard, say) is a new entry, placed by what it must follow.

The order is part of the result, and it is the order of these definitions:
  * measurements fill the row before ``write_row`` writes it, in a fixed order (the row's
    keys, and so the bytes of metrics.jsonl, follow it);
  * the optimizer's diagnostics, exact curvature, evaluation under FSDP and checkpoints
    are collective: every rank must reach them in the same order;
  * the checkpoint comes after the row it covers (resume drops rows logged after it);
  * progress last, so the bar shows the step once everything about it is done.

A hook that sets ``trainer.stop_reason`` ends the run after this step: the hooks after it
still run, with evaluation and the checkpoint due as at the last step, so a stopped run
ends like a finished one, one step early (the stability guard's ``stop``).
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..curvature.guard import LOGGER_NAME
from ..metrics import (CRITICAL, OPTIM_PREFIX, STABILITY_RATIO, TRAIN_GRAD_NORM, TRAIN_LOSS, TRAIN_SKIPPED,
                       TWO_OVER_LR, WARMUP_CAP, WARMUP_LR, WARMUP_STEPS)

if TYPE_CHECKING:
    import torch

    from .config import TrainConfig

# The running training.trainer.Trainer. Not imported, even for type checking: trainer.py
# imports this module, and the import graph stays free of cycles.
Trainer = Any


@dataclass(frozen=True)
class StepResult:
    """What one step did, for the hooks."""

    done: int
    """Steps completed, this one included (the row's ``step``)."""
    lr: float
    """Learning rate of the step."""
    loss: torch.Tensor
    """Training loss, the mean over ranks (0-dim)."""
    grad_norm: Any
    """Gradient norm before clipping (a tensor, a DTensor under FSDP); None when skipped."""
    skipped: bool
    """The loss was not finite and ``on_nonfinite="skip"``: no update was taken."""
    logged: bool
    """A step whose training metrics are logged (every ``log_every``, and the last)."""


StepHook = Callable[[Trainer, StepResult, dict[str, Any]], None]


def _to_float(value) -> float:
    """A 0-d tensor as a float; a DTensor (FSDP's gradient norm) through its full value."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)


def train_metrics(trainer: Trainer, step: StepResult, row: dict[str, Any]) -> None:
    """Loss, gradient norm and the optimizer's diagnostics on logged steps."""
    if step.skipped:
        row[TRAIN_SKIPPED] = 1
    elif step.logged:
        row.update({"lr": step.lr, TRAIN_LOSS: float(step.loss), TRAIN_GRAD_NORM: _to_float(step.grad_norm)})
        if trainer.multi_pass:
            row.update({OPTIM_PREFIX + key: value for key, value in trainer.optimizer_stats().items()})


def critical_sharpness(trainer: Trainer, step: StepResult, row: dict[str, Any]) -> None:
    """The monitor's measurement, made inside the step, where it made one. After a skipped
    step ``latest`` still holds an earlier step's, which is not this row's."""
    monitor = trainer.monitor
    if not step.skipped and monitor is not None and monitor.latest is not None:
        row.update(monitor.latest)
        row["lr"] = step.lr
        row[TWO_OVER_LR] = 2.0 / step.lr


def stability(trainer: Trainer, step: StepResult, row: dict[str, Any]) -> None:
    """The guard's word on this step's measurement (its stability/* metrics are already in
    the row, from the monitor): a line when an alarm begins or the lr is cut, and the end
    of the run when it says stop. Every rank reads the same measurements, so every rank
    takes the same decision (rank 0 alone writes the line)."""
    guard = trainer.monitor.guard if trainer.monitor is not None else None
    if guard is None or step.skipped or guard.event is None:
        return
    line = f"guard ({guard.settings.action}): {guard.message}"
    if trainer.rank == 0:
        if trainer.progress is not None:
            trainer.progress.write(line)
        else:
            logging.getLogger(LOGGER_NAME).warning(line)
    if guard.event == "stop":
        trainer.stop_reason = guard.message


def warmup(trainer: Trainer, step: StepResult, row: dict[str, Any]) -> None:
    """The automatic warmup's lr and cap on each of its steps, and its length on the step
    it ended (the first step on the schedule). A fixed warmup adds nothing."""
    w = trainer.warmup
    if w is None or not (w.active or w.end == step.done - 1):
        return
    row[WARMUP_LR] = w.lr
    if w.cap is not None:
        row[WARMUP_CAP] = w.cap
    if w.end is not None:
        row[WARMUP_STEPS] = w.end


def _ends(trainer: Trainer, step: StepResult) -> bool:
    """The last step of the run: the planned one, or one a hook stopped the run at."""
    return step.done == trainer.config.steps or trainer.stop_reason is not None


def exact_curvature(trainer: Trainer, step: StepResult, row: dict[str, Any]) -> None:
    every = trainer.config.monitor.exact_every
    if every and step.done % every == 0:
        row.update(trainer.exact_curvature())


def evaluation(trainer: Trainer, step: StepResult, row: dict[str, Any]) -> None:
    """Validation on its cadence and at the end: rank 0 alone, or every rank under FSDP
    (its forwards are collective)."""
    cfg = trainer.config
    due = _ends(trainer, step) or (cfg.eval.every and step.done % cfg.eval.every == 0)
    if due and (trainer.rank == 0 or trainer.fsdp):
        row.update(trainer.evaluate())


def write_row(trainer: Trainer, step: StepResult, row: dict[str, Any]) -> None:
    if trainer.writer is not None and len(row) > 3:  # rank 0 alone writes
        trainer.writer.log(row)


def checkpoint(trainer: Trainer, step: StepResult, row: dict[str, Any]) -> None:
    cfg = trainer.config
    if _ends(trainer, step) or (cfg.checkpoint.every and step.done % cfg.checkpoint.every == 0):
        trainer.write_checkpoint(step.done)
    if trainer.stop_reason is not None and trainer.rank == 0:
        # One line saying why, whether or not a progress bar is shown.
        print(f"[train] {cfg.name}: stopped at step {step.done} of {cfg.steps} by the stability guard: "
              f"{trainer.stop_reason}; final checkpoint step{step.done:08d}", file=sys.stderr)


def progress(trainer: Trainer, step: StepResult, row: dict[str, Any]) -> None:
    """The caller's ``on_step(done, total)`` (rank 0), then the progress bar."""
    if trainer.on_step is not None and trainer.rank == 0:
        trainer.on_step(step.done, trainer.config.steps)
    if trainer.progress is not None:
        trainer.progress.update(step, row)


STEP_HOOKS: tuple[StepHook, ...] = (train_metrics, critical_sharpness, stability, warmup, exact_curvature,
                                    evaluation, write_row, checkpoint, progress)


class ProgressBar:
    """tqdm on stderr: steps, ETA, the loss and the latest critical sharpness."""

    def __init__(self, config: TrainConfig, initial: int):
        from tqdm import tqdm

        self.bar = tqdm(total=config.steps, initial=initial, desc=config.name, unit="step", file=sys.stderr,
                        dynamic_ncols=True)
        self.last_lambda = math.nan
        self.last_ratio: float | None = None  # shown once the guard has logged a ratio

    def update(self, step: StepResult, row: dict[str, Any]) -> None:
        self.last_lambda = row.get(CRITICAL, self.last_lambda)
        self.last_ratio = row.get(STABILITY_RATIO, self.last_ratio)
        self.bar.update(1)
        extra = {} if self.last_ratio is None else {"lr/eta_c": f"{self.last_ratio:.3g}"}
        self.bar.set_postfix(loss=f"{float(step.loss):.3f}", lam_c=f"{self.last_lambda:.3g}", **extra,
                             refresh=False)

    def write(self, line: str) -> None:
        """A line above the bar (the bar is redrawn below it)."""
        self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
