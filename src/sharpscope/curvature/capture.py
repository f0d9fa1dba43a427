"""Capture the update direction of any optimizer by differencing around ``step()``.

    with DirectionCapture(model, optimizer=opt) as capture:
        opt.step()
    d = capture.direction          # (θ_before − θ_after) / lr, one tensor per parameter

Nothing about the optimizer's internals is assumed: SGD, Adam, AdamW, the SAM family,
Nexus or a custom optimizer all work, and decoupled weight decay is part of d because it
is part of the step. One reference lr divides the whole step, so θ_after = θ_before − lr·d
exactly and the line search runs along the step the optimizer took, even when parameter
groups have different lrs (dividing each group by its own lr would bend the line). The
reference lr is that of the first parameter group holding a captured parameter with
lr > 0, read when the block is entered (before a scheduler moves it); it is the lr to
compare with η_c. Cost: one copy of the trainable parameters.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from ..tensors.state import trainable_parameters

__all__ = ["DirectionCapture"]


def _lr_value(lr) -> float:
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


class DirectionCapture:
    """Records d = (θ_before − θ_after)/lr around an optimizer step.

    ``target`` is a model (its trainable parameters, in ``parameters()`` order) or an
    iterable of parameters. The reference lr comes from ``optimizer`` (see the module
    notes) or from ``lr``. With ``keep_before=True`` the pre-step parameters stay available as
    ``.before`` (the monitor measures there); otherwise their copy is turned into the
    direction in place. If the block raises, nothing is recorded.
    """

    def __init__(
        self,
        target: torch.nn.Module | Iterable[torch.Tensor],
        optimizer: torch.optim.Optimizer | None = None,
        *,
        lr: float | None = None,
        keep_before: bool = False,
    ):
        if isinstance(target, torch.nn.Module):
            self.params = trainable_parameters(target)
        else:
            self.params = [p for p in target if p.requires_grad]
        if not self.params:
            raise ValueError("DirectionCapture needs at least one parameter with requires_grad")
        if optimizer is None and lr is None:
            raise ValueError("give the optimizer (its lr is read per group) or an explicit lr")
        self.optimizer = optimizer
        self.fixed_lr = lr
        self.keep_before = keep_before
        self.direction: list[torch.Tensor] | None = None
        self.before: list[torch.Tensor] | None = None
        self._lr = math.nan

    def step_lr(self) -> float:
        """The reference lr of the coming step as the optimizer holds it now (0 during a
        warmup from zero; see the module notes). Raises only for a group without 'lr'."""
        if self.fixed_lr is not None:
            return float(self.fixed_lr)
        captured = {id(p) for p in self.params}
        lr = None
        for i, group in enumerate(self.optimizer.param_groups):
            if "lr" not in group:
                raise ValueError(
                    f"parameter group {i} of {type(self.optimizer).__name__} has no 'lr'; "
                    "pass DirectionCapture(..., lr=...) to say which step size d is relative to"
                )
            value = _lr_value(group["lr"])
            if lr is None and value != 0 and any(id(p) in captured for p in group["params"]):
                lr = value
        if lr is None:
            # Nothing captured is in a group with a nonzero lr: report the first group's.
            lr = _lr_value(self.optimizer.param_groups[0]["lr"])
        return lr

    def _reference_lr(self) -> float:
        lr = self.step_lr()
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(
                f"cannot capture a direction with learning rate {lr}: d = Δθ/lr needs lr > 0"
            )
        return lr

    @property
    def lr(self) -> float:
        """The reference lr: θ_after = θ_before − lr·d (the lr to compare with η_c)."""
        return self._lr

    def __enter__(self) -> "DirectionCapture":
        self._lr = self._reference_lr()
        self.direction = None
        with torch.no_grad():
            self._start = [p.detach().clone() for p in self.params]
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        start, self._start = self._start, None
        if exc_type is not None:
            return
        with torch.no_grad():
            if self.keep_before:
                self.before = start
                self.direction = [(s - p).div_(self._lr) for s, p in zip(start, self.params)]
            else:
                self.before = None
                self.direction = [s.sub_(p).div_(self._lr) for s, p in zip(start, self.params)]
