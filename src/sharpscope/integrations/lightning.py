"""Critical sharpness inside a Lightning ``Trainer``.

    from sharpscope.integrations.lightning import SharpnessCallback
    callback = SharpnessCallback(probe_batch, loss_fn=lambda module, b: module.loss(b), every=50)
    lightning.Trainer(callbacks=[callback], ...).fit(module, loader)

The direction is captured from ``on_before_optimizer_step`` to ``on_train_batch_end``
(the optimizer has stepped by then); ``loss_fn(module, batch)`` returns the mean loss as
a 0-dim tensor (Lightning modules differ too much for a default). Metrics go to
``pl_module.log`` (every logger sees them) and, with ``run_dir``, to a sharpscope run.
Gradient accumulation works: only steps where the optimizer actually steps are measured.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl

from ._common import MonitorRecorder, finite


class SharpnessCallback(pl.Callback):
    """Runs a :class:`sharpscope.SharpnessMonitor` every ``every`` optimizer steps."""

    def __init__(self, probe_batch, *, loss_fn, every: int = 250, run_dir: str | Path | None = None,
                 name: str = "lightning-run", **monitor_options):
        self.recorder = MonitorRecorder(probe_batch, loss_fn, every=every, run_dir=run_dir, name=name,
                                        monitor_options=monitor_options)
        self._lr: float | None = None
        self._armed = False

    @property
    def history(self):
        return self.recorder.history

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        monitor = self.recorder.ensure(pl_module, optimizer)
        monitor.begin_step(trainer.global_step)
        self._lr = monitor.optimizer.param_groups[0]["lr"]
        self._armed = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._armed:
            return
        self._armed = False
        metrics = self.recorder.monitor.end_step()
        step = trainer.global_step - 1  # global_step counts the step just taken
        if metrics:
            pl_module.log_dict(finite(metrics), on_step=True, on_epoch=False)
            self.recorder.record(step, metrics, self._lr, trainer.max_steps if trainer.max_steps > 0 else None)

    def on_train_end(self, trainer, pl_module):
        self.recorder.close()
