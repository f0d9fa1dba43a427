"""Capture the update direction of any optimizer by differencing around ``step()``.

    with DirectionCapture(model, optimizer=opt) as capture:
        opt.step()
    d = capture.direction          # (θ_before − θ_after) / lr, one tensor per parameter

Nothing about the optimizer's internals is assumed: SGD, Adam, AdamW, the SAM family,
Nexus or a custom optimizer all work, and decoupled weight decay is part of d because it
is part of the step. The lr is read from each parameter's group when the block is entered
(before a scheduler moves it). Cost: one copy of the trainable parameters.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from ._state import trainable_parameters

__all__ = ["DirectionCapture"]


def _lr_value(lr) -> float:
    return float(lr.item()) if isinstance(lr, torch.Tensor) else float(lr)


class DirectionCapture:
    """Records d = (θ_before − θ_after)/lr around an optimizer step.

    ``target`` is a model (its trainable parameters, in ``parameters()`` order) or an
    iterable of parameters. The lr comes from ``optimizer`` (per parameter group) or from
    ``lr``. With ``keep_before=True`` the pre-step parameters stay available as
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
        self.lrs: list[float] = []

    def _learning_rates(self) -> list[float]:
        if self.fixed_lr is not None:
            lrs = [float(self.fixed_lr)] * len(self.params)
        else:
            by_param = {}
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    by_param[p] = _lr_value(group["lr"])
            first = _lr_value(self.optimizer.param_groups[0]["lr"])
            # A parameter outside every group does not move; any lr gives d = 0 for it.
            lrs = [by_param.get(p, first) for p in self.params]
        for lr in lrs:
            if not (math.isfinite(lr) and lr > 0):
                raise ValueError(
                    f"cannot capture a direction with learning rate {lr}: d = Δθ/lr needs lr > 0"
                )
        return lrs

    @property
    def lr(self) -> float:
        """The learning rate of the first parameter group (the one reported beside η_c)."""
        return self.lrs[0]

    def __enter__(self) -> "DirectionCapture":
        self.lrs = self._learning_rates()
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
                self.direction = [(s - p).div_(lr) for s, p, lr in zip(start, self.params, self.lrs)]
            else:
                self.before = None
                self.direction = [
                    s.sub_(p).div_(lr) for s, p, lr in zip(start, self.params, self.lrs)
                ]
