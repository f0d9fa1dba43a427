"""Critical sharpness inside a Hugging Face ``transformers.Trainer``.

    from sharpscope.integrations.hf import SharpnessCallback
    callback = SharpnessCallback(probe_batch, every=50, run_dir="runs/my-finetune")
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback]).train()

Steps are the Trainer's own: step N is the N-th optimizer step, the number HF gives the
loss, grad norm and lr it logs for that update. A measurement at step N is taken at the
weights before that update, along the update itself (captured between
``on_pre_optimizer_step`` and ``on_optimizer_step``, after clipping, whatever the
optimizer and the gradient accumulation), on the fixed ``probe_batch`` (a dict such as
``{"input_ids": ..., "labels": ...}``). Measurements are due at step 1 and every
``every``-th step; a step with lr 0 (a warmup from zero) is skipped and the measurement
taken at the next step with lr > 0 (``sharpness/deferred_from`` says so).

Every measurement reaches the Trainer's logs exactly once, at its step: the callback asks
the Trainer to log on each measured step (those steps get a loss entry too, averaged since
the previous log as HF does), puts the values in that log, and places itself ahead of the
reporters (TensorBoard, W&B, ...) so they receive them. With ``run_dir`` it also writes a
run in sharpscope's format: the Trainer's ``train/loss``, ``train/grad_norm`` and ``lr``
at its logging steps and the measurements, one row per step. The monitor's warm start
travels in the Trainer's own state (``trainer_state.json`` of each ``checkpoint-N``, under
``stateful_callbacks``), so ``resume_from_checkpoint``, from any path, continues the run
directory and the warm start where the checkpoint left them. A new (not resumed) run
refuses a ``run_dir`` that already holds rows unless ``overwrite=True``.

``guard=`` (a monitor option, docs/guard.md) adds the stability guard: its ``stability/*``
metrics reach the logs with the measurement, an alarm or a cut of the lr is a warning on
the ``sharpscope.guard`` logger, ``cap`` scales every group's lr on top of the Trainer's
scheduler (the run directory's ``lr`` is then the lr applied, the scheduler's times the
scale, as in Lightning's runs and the trainer's; HF's own ``learning_rate`` stays the
scheduler's), and ``stop`` sets ``control.should_training_stop`` (with a checkpoint, unless
``save_strategy="no"``). The guard's state travels with the monitor's.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from transformers import TrainerCallback

from ._common import MonitorRecorder, finite, guard_event
from ..metrics import EVAL_LOSS, TRAIN_GRAD_NORM, TRAIN_LOSS

# The key of the monitor's state in TrainerState.stateful_callbacks. Not the class name:
# with restore_callback_states_from_checkpoint the Trainer would rebuild callbacks whose
# class name matches from saved init arguments, and a probe batch is not one.
STATE_KEY = "sharpscope.SharpnessMonitor"

# The Trainer's log keys and their run-format names.
_LOG_KEYS = {"loss": TRAIN_LOSS, "grad_norm": TRAIN_GRAD_NORM, "learning_rate": "lr",
             "eval_loss": EVAL_LOSS, "num_input_tokens_seen": "tokens"}


def causal_lm_loss(model, batch) -> Any:
    """The model's own loss on a batch dict that carries labels."""
    return model(**batch).loss


def causal_lm_sequence_losses(model, batch) -> Any:
    """Per-sequence losses whose mean is the causal-LM loss of ``batch`` (a dict with
    ``labels``, -100 where a token is not predicted): the next-token cross-entropy summed
    over each row's predicted tokens, times rows / predicted tokens of the batch. The mean
    over rows is then the mean over predicted tokens, what the model's own loss computes
    (``causal_lm_loss``), and the rows let the critical-sharpness search report its
    standard error over the probe's sequences. The callback's default loss."""
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = labels[:, 1:]
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                ignore_index=-100, reduction="none").view(targets.shape)
    predicted = (targets != -100).sum().clamp(min=1)
    return per_token.sum(dim=1) * (targets.shape[0] / predicted)


def _calling_handler(callback) -> Any:
    """The Trainer's CallbackHandler that is calling ``callback`` (found on the stack:
    callbacks are not given the handler or the Trainer)."""
    frame = sys._getframe(1)
    for _ in range(6):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if owner is not None and callback in getattr(owner, "callbacks", ()) and hasattr(owner, "call_event"):
            return owner
        frame = frame.f_back
    return None


class SharpnessCallback(TrainerCallback):
    """Runs a :class:`sharpscope.SharpnessMonitor` at step 1 and every ``every`` optimizer
    steps; ``group`` / ``model`` label the run for ``sharpscope analyze`` (e.g.
    ``group="scales", model="llama-60M"``); other keyword arguments go to the monitor
    (``method``, ``rtol``, ``autocast``, ``exact_every`` ...) and are checked here."""

    def __init__(self, probe_batch: dict, *, every: int = 250, loss_fn=None, run_dir: str | Path | None = None,
                 name: str = "hf-run", group: str = "training", model: str | None = None,
                 overwrite: bool = False, **monitor_options):
        self.recorder = MonitorRecorder(probe_batch, loss_fn or causal_lm_sequence_losses, every=every, run_dir=run_dir,
                                        name=name, group=group, model=model, framework="transformers",
                                        overwrite=overwrite, monitor_options=monitor_options)
        self.every = every
        self.exact_every = int(monitor_options.get("exact_every", 0))
        self.resumed_from: int | None = None
        self._step: int | None = None
        self._lr: float | None = None
        self._pending: tuple[int, dict[str, float]] | None = None
        self._stop = False
        self._micro_batches: list[dict] = []  # probe="step": the training forwards of the coming step
        self._forward_hook = None

    @property
    def history(self) -> list[tuple[int, dict[str, float]]]:
        return self.recorder.history

    def _due(self, step: int, every: int) -> bool:
        return every > 0 and (step == 1 or step % every == 0)

    def _run_before_reporters(self) -> None:
        # The Trainer calls its reporters (TensorBoard, W&B ...) before user callbacks, so
        # values added to ``logs`` by this callback would reach them one log too late, or
        # never. Moving this callback to the front of the list fixes the order; it is safe
        # during an event (the loop's next element is unchanged).
        handler = _calling_handler(self)
        if handler is not None and handler.callbacks[0] is not self:
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)

    def on_init_end(self, args, state, control, **kwargs):
        self._run_before_reporters()

    def _capture_training_inputs(self, module, args, kwargs) -> None:
        # A training forward (train mode, with gradients): the measurement's own forwards run
        # in eval mode without gradients, and evaluation in eval mode, so neither is taken.
        if module.training and torch.is_grad_enabled() and not args:
            # The inputs only: the loss's normaliser (num_items_in_batch) belongs to the step.
            self._micro_batches.append({k: v for k, v in kwargs.items()
                                        if isinstance(v, torch.Tensor) and k != "num_items_in_batch"})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.recorder.probe == "step" and model is not None and self._forward_hook is None:
            self._forward_hook = model.register_forward_pre_hook(self._capture_training_inputs, with_kwargs=True)
        self._micro_batches = []
        self._run_before_reporters()
        self._pending = None
        self._stop = False
        if state.global_step > 0:  # resume_from_checkpoint: the Trainer loaded checkpoint-N's state
            self.resumed_from = state.global_step
            saved = (state.stateful_callbacks or {}).get(STATE_KEY)
            self.recorder.start(state.global_step, saved if isinstance(saved, dict) else None)
        else:
            self.resumed_from = None
            self.recorder.start(None, None)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        monitor = self.recorder.ensure(model, optimizer, state.max_steps)
        self._step = state.global_step + 1  # the number HF gives this update in its logs
        batches, self._micro_batches = self._micro_batches, []
        capture = monitor.begin_step(self._step, batch=batches or None, due=self._due(self._step, self.every),
                                     exact_due=self._due(self._step, self.exact_every))
        self._lr = capture.lr if capture is not None else None

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.recorder.monitor is None:
            return
        metrics = self.recorder.monitor.end_step()
        if metrics:
            self._pending = (self._step, self.recorder.measured(self._step, metrics, self._lr))
        self._stop = guard_event(self.recorder.monitor) == "stop" or self._stop

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending is not None:
            control.should_log = True  # the Trainer logs this step, with the measurement in it
        if self._stop:
            control.should_training_stop = True
            if getattr(args.save_strategy, "value", args.save_strategy) != "no":
                control.should_save = True  # the run ends with a checkpoint of this step
        if self.recorder.monitor is not None:
            # Kept current in the Trainer's state, so any checkpoint saved after this step
            # carries the warm start in its trainer_state.json.
            if state.stateful_callbacks is None:
                state.stateful_callbacks = {}
            state.stateful_callbacks[STATE_KEY] = self.recorder.monitor.state_dict()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        if self._pending is not None and self._pending[0] == state.global_step:
            values = finite(self._pending[1])
            logs.update(values)
            # The Trainer appended its copy of these logs to the history before this call.
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(values)
            self._pending = None
        row = {_LOG_KEYS[k]: float(v) for k, v in logs.items() if k in _LOG_KEYS and isinstance(v, (int, float))}
        if row.get("lr") == 0:
            row.pop("lr")
        monitor = self.recorder.monitor
        if "lr" in row and monitor is not None and monitor.step_lr_scale != 1.0:
            # HF logs the scheduler's lr; the run's lr is the one the step applied (a cap's
            # scale included), so lr/η_c and 2/lr hold on its rows as in the trainer's and
            # Lightning's. This log follows the step it reports: its scale is still current.
            row["lr"] *= monitor.step_lr_scale
        self.recorder.add(state.global_step, row, state.max_steps or None)

    def on_save(self, args, state, control, **kwargs):
        self.recorder.flush()  # the run directory as of this checkpoint

    def on_train_end(self, args, state, control, **kwargs):
        if self._forward_hook is not None:
            self._forward_hook.remove()
            self._forward_hook = None
        self._micro_batches = []
        self.recorder.close()
