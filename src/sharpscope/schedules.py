"""Learning-rate schedules as pure functions of the step.

A schedule returns the multiplier of the peak learning rate at a step, so resuming a run
needs only the step count. All five share a linear warm-up, ``(step + 1) / (warmup + 1)``,
which never yields a zero rate at step 0. The functions accept numpy arrays as well as
ints (the simulator evaluates whole trajectories at once); they import no torch.

=====================  ========================================================================
name                   multiplier after warm-up, u = (step - warmup) / (total - warmup)
=====================  ========================================================================
``cosine``             m + (1 - m)(1 + cos(pi u)) / 2
``linear``             m + (1 - m)(1 - u)
``constant``           1
``wsd``                1 until ``total - decay_steps``, then linear down to m (warmup-stable-decay)
``cosine_restarts``    cosine over each cycle of ``cycle_steps`` steps, restarting at 1
                       (equals ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts`` with
                       ``T_0 = cycle_steps``, ``T_mult = 1``, ``eta_min = m * lr``)
=====================  ========================================================================
m is ``min_ratio``.
"""

from __future__ import annotations

import numpy as np

from .errors import UserError

SCHEDULES = ("cosine", "linear", "constant", "wsd", "cosine_restarts")


def lr_multiplier(name: str, step, total_steps: float, *, warmup_steps: float = 0, min_ratio: float = 0.1,
                  decay_steps: float | None = None, cycle_steps: float | None = None):
    """Multiplier of the peak learning rate at ``step`` (scalar or array)."""
    if name not in SCHEDULES:
        raise UserError(f"unknown schedule '{name}'; choose one of {', '.join(SCHEDULES)}")
    if total_steps <= 0:
        raise UserError(f"total_steps must be positive, got {total_steps}")
    scalar = np.ndim(step) == 0
    s = np.asarray(step, dtype=float)
    warm = (s + 1.0) / (warmup_steps + 1.0)
    span = max(total_steps - warmup_steps, 1e-12)
    after = s - warmup_steps
    u = np.clip(after / span, 0.0, 1.0)
    if name == "cosine":
        main = min_ratio + (1 - min_ratio) * 0.5 * (1 + np.cos(np.pi * u))
    elif name == "linear":
        main = min_ratio + (1 - min_ratio) * (1 - u)
    elif name == "constant":
        main = np.ones_like(u)
    elif name == "wsd":
        decay = 0.2 * total_steps if decay_steps is None else float(decay_steps)
        start = total_steps - decay
        frac = np.clip((s - start) / max(decay, 1e-12), 0.0, 1.0)
        main = 1 - (1 - min_ratio) * frac
    else:  # cosine_restarts
        cycle = 0.25 * span if cycle_steps is None else float(cycle_steps)
        if cycle <= 0:
            raise UserError(f"cycle_steps must be positive, got {cycle}")
        pos = np.mod(np.maximum(after, 0.0), cycle) / cycle
        # The last step closes a cycle rather than opening a new one.
        pos = np.where((after >= span) & (pos == 0.0), 1.0, pos)
        main = min_ratio + (1 - min_ratio) * 0.5 * (1 + np.cos(np.pi * pos))
    out = np.where(s < warmup_steps, np.minimum(warm, 1.0), main)
    return float(out) if scalar else out
