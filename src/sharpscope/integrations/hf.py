"""Critical sharpness inside a Hugging Face ``transformers.Trainer``.

    from sharpscope.integrations.hf import SharpnessCallback
    callback = SharpnessCallback(probe_batch, every=50, run_dir="runs/my-finetune")
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback]).train()

The direction is captured between the Trainer's ``on_pre_optimizer_step`` and
``on_optimizer_step`` hooks (after clipping, exactly the update applied), the measurement
runs on the fixed ``probe_batch`` (a dict such as ``{"input_ids": ..., "labels": ...}``),
and its metrics join the next ``logs`` (so TensorBoard / W&B reporters see them) and, with
``run_dir``, a run in sharpscope's format together with the training loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ._common import MonitorRecorder, finite


def causal_lm_loss(model, batch) -> Any:
    """The model's own loss on a batch dict that carries labels."""
    return model(**batch).loss


class SharpnessCallback(TrainerCallback):
    """Runs a :class:`sharpscope.SharpnessMonitor` every ``every`` optimizer steps."""

    def __init__(self, probe_batch: dict, *, every: int = 250, loss_fn=None, run_dir: str | Path | None = None,
                 name: str = "hf-run", **monitor_options):
        self.recorder = MonitorRecorder(probe_batch, loss_fn or causal_lm_loss, every=every, run_dir=run_dir,
                                        name=name, monitor_options=monitor_options)
        self._pending: dict[str, float] | None = None
        self._lr: float | None = None

    @property
    def history(self) -> list[tuple[int, dict[str, float]]]:
        return self.recorder.history

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        monitor = self.recorder.ensure(model, optimizer)
        monitor.begin_step(state.global_step)
        self._lr = monitor.optimizer.param_groups[0]["lr"]

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.recorder.monitor is None:
            return
        metrics = self.recorder.monitor.end_step()
        if metrics:
            self._pending = metrics
            self.recorder.record(state.global_step, metrics, self._lr, state.max_steps or None)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if self._pending:
            values = finite(self._pending)
            logs.update(values)  # reporters called after this callback (TensorBoard, W&B) see them
            # the Trainer stored a copy of these logs already: keep its history complete too
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(values)
            self._pending = None
        if "loss" in logs:
            self.recorder.record(state.global_step, None, None, state.max_steps or None,
                                 extra={"train/loss": float(logs["loss"])})

    def on_train_end(self, args, state, control, **kwargs):
        self.recorder.close()
