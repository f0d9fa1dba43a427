"""Critical sharpness inside a Lightning ``Trainer``.

    from sharpscope.integrations.lightning import SharpnessCallback
    callback = SharpnessCallback(probe_batch, loss_fn=lambda module, b: module.loss(b), every=50)
    lightning.Trainer(callbacks=[callback], ...).fit(module, loader)

Steps are Lightning's own: step s is the s-th optimizer step counted from 0, the step
Lightning gives the metrics a ``training_step`` logs for that update. A measurement at
step s is taken at the weights before the update, along the update itself (captured from
``on_before_optimizer_step`` to ``on_train_batch_end``, so with gradient accumulation only
steps where the optimizer steps are measured), on the fixed probe batch;
``loss_fn(module, batch)`` returns the mean loss as a 0-dim tensor (Lightning modules
differ too much for a default). Measurements are due at step 0 and every ``every``-th.

Each measurement goes straight to every logger of the Trainer at its step, whatever
``log_every_n_steps`` is, and replaces the callback's previous values in
``trainer.callback_metrics`` (so a ``ModelCheckpoint(monitor="sharpness/critical")`` sees
the latest one, and a failed measurement leaves no old value behind). With ``run_dir`` a
run in sharpscope's format gets ``train/loss`` (mean over the step's micro-batches),
``train/grad_norm`` (before clipping) and ``lr`` every ``log_every`` steps (the Trainer's
``log_every_n_steps`` by default) and the measurements. The monitor's warm start is part
of Lightning checkpoints (callback state), so ``fit(ckpt_path=...)`` resumes it. A new
(not resumed) fit refuses a ``run_dir`` that already holds rows unless ``overwrite=True``.
One optimizer, automatic optimization: with several optimizers the monitor follows the
first one handed to it.

``guard=`` (a monitor option, docs/guard.md) adds the stability guard: ``stability/*``
metrics go to the loggers with the measurement, an alarm or a cut of the lr is a warning
on the ``sharpscope.guard`` logger, ``cap`` scales every group's lr on top of the
scheduler (put back right after ``optimizer.step()``, before Lightning steps its
scheduler), and ``stop`` sets ``trainer.should_stop``.
"""

from __future__ import annotations

import math

from pathlib import Path

import lightning.pytorch as pl
import torch

from ..tensors.vectors import norm
from ._common import MonitorRecorder, finite, guard_event
from ..metrics import TRAIN_GRAD_NORM, TRAIN_LOSS



def _total_steps(trainer) -> int | None:
    """The run's optimizer steps: max_steps, or what Lightning estimates from the epochs."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # no dataloader length (an iterable dataset): unknown
        return None
    return int(total) if isinstance(total, (int, float)) and math.isfinite(total) and total > 0 else None


class SharpnessCallback(pl.Callback):
    """Runs a :class:`sharpscope.SharpnessMonitor` every ``every`` optimizer steps;
    ``group`` / ``model`` label the run for ``sharpscope analyze``; other keyword
    arguments go to the monitor and are checked here."""

    def __init__(self, probe_batch, *, loss_fn, every: int = 250, run_dir: str | Path | None = None,
                 name: str = "lightning-run", group: str = "training", model: str | None = None,
                 log_every: int | None = None, overwrite: bool = False, **monitor_options):
        if log_every is not None and (isinstance(log_every, bool) or not isinstance(log_every, int)
                                      or log_every < 1):
            raise ValueError(f"log_every must be a positive integer (or None: the Trainer's "
                             f"log_every_n_steps), not {log_every!r}")
        self.recorder = MonitorRecorder(probe_batch, loss_fn, every=every, run_dir=run_dir, name=name,
                                        group=group, model=model, framework="lightning",
                                        overwrite=overwrite, monitor_options=monitor_options)
        self.log_every = log_every
        self._armed = False
        self._lr: float | None = None
        self._step_values: dict[str, float] = {}
        self._loss_sum = 0.0
        self._logged_keys: set[str] = set()
        self._restored: dict | None = None
        self._micro_batches: list = []  # probe="step": the micro-batches of the coming step

    @property
    def history(self):
        return self.recorder.history

    # -- checkpoint state (Lightning saves and restores it with the Trainer) -------------

    def state_dict(self) -> dict:
        monitor = self.recorder.monitor
        if monitor is not None:
            return {"monitor": monitor.state_dict()}
        return {"monitor": self.recorder.pending_state}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = state_dict.get("monitor")

    # -- hooks -------------------------------------------------------------------------

    def on_train_start(self, trainer, pl_module):
        # A resumed fit keeps the run's rows up to the last step the checkpoint had taken.
        restored, self._restored = self._restored, None
        resumed = trainer.global_step > 0
        self.recorder.start(trainer.global_step - 1 if resumed else None, restored if resumed else None)
        self._armed, self._loss_sum, self._logged_keys = False, 0.0, set()

    def _records(self, trainer, step: int) -> bool:
        every = self.log_every or trainer.log_every_n_steps
        return self.recorder.run_dir is not None and every > 0 and step % every == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.recorder.probe == "step":
            # Every micro-batch the coming optimizer step accumulates: together they are the
            # batch the step was computed on (their mean loss is the step's loss).
            self._micro_batches.append(batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        monitor = self.recorder.ensure(pl_module, optimizer, _total_steps(trainer))
        step = trainer.global_step
        batches, self._micro_batches = self._micro_batches, []
        capture = monitor.begin_step(step, batch=batches or None)
        inner = getattr(optimizer, "optimizer", optimizer)
        self._lr = capture.lr if capture is not None else float(inner.param_groups[0]["lr"])
        self._step_values = {}
        if self.recorder.run_dir is not None and (capture is not None or self._records(trainer, step)):
            # Only the run directory uses these. Lightning clips after this hook: this is the norm before clipping, as HF logs it.
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            if grads:
                self._step_values[TRAIN_GRAD_NORM] = norm(grads)
            self._step_values["lr"] = self._lr
        self._armed = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Lightning hands back each micro-batch's loss already divided by the number of
        # accumulated batches: their sum over a step is the step's mean loss.
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            self._loss_sum += float(loss.detach())
        if not self._armed:
            return
        self._armed = False
        step = trainer.global_step - 1  # global_step already counts the step just taken
        values, self._step_values = self._step_values, {}
        values[TRAIN_LOSS], self._loss_sum = self._loss_sum, 0.0
        metrics = self.recorder.monitor.end_step()
        total = trainer.max_steps if trainer.max_steps > 0 else None
        if metrics:
            metrics = self.recorder.measured(step, metrics, self._lr)
            self._publish(trainer, step, finite(metrics))
        if guard_event(self.recorder.monitor) == "stop":
            trainer.should_stop = True
        if self._records(trainer, step) or metrics:
            self.recorder.add(step, values, total)

    def _publish(self, trainer, step: int, values: dict[str, float]) -> None:
        """Each measurement to every logger at its own step, and in callback_metrics in
        place of the previous one (no stale λ_c or failure flag is left behind)."""
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
        callback_metrics = trainer.callback_metrics
        for key in self._logged_keys - values.keys():
            callback_metrics.pop(key, None)
        for key, value in values.items():
            callback_metrics[key] = torch.tensor(value)
        self._logged_keys = set(values)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.recorder.flush()  # the run directory as of this checkpoint

    def on_train_end(self, trainer, pl_module):
        self.recorder.close()
