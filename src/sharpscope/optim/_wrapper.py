"""What the SAM family and Nexus share: a base optimizer wrapped, several passes per step.

Every optimizer here computes a gradient from more than one forward+backward pass and then
hands it to a base optimizer (AdamW by default) that does the update. The wrapper
therefore

* shares the base optimizer's ``param_groups`` and ``state`` (so LR schedulers, the
  trainer's lr setting, ``DirectionCapture`` and ``preconditioned_sharpness`` see the
  real groups and Adam moments), and its ``state_dict`` holds the base state exactly;
* runs a step as a sequence of *passes*. With a closure::

      loss = opt.step(closure)            # closure() -> (outputs, loss), forward only

  or, for loops that cannot hand over a closure (gradient clipping by the caller,
  a monitor around the update, a different batch per pass)::

      for k in opt.passes():              # a context is open around each pass
          outputs, loss = forward(batch)
          opt.backward(outputs, loss)     # the optimizer runs the backward itself
      opt.step()                          # the base update with the gradient built

  ``outputs`` is the tensor the loss was computed from (the logits); the methods that
  split the gradient at the logits need it.
* keeps one copy of the parameters (the point θ the step starts from) and restores it
  with ``copy_``, bit for bit, never by rebinding ``.data``.

The optimizer owns ``.grad`` during a step: each pass starts from gradients it set
itself, and whatever was in ``.grad`` before the first pass is discarded.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from ..tensors.state import restore_rng_states, rng_states

Closure = Callable[[], tuple[torch.Tensor, torch.Tensor]]


def _check_outputs(outputs: torch.Tensor, loss: torch.Tensor) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise TypeError("the closure must return (outputs, loss) with loss a scalar tensor")
    if not loss.requires_grad:
        raise RuntimeError("the loss does not require grad: run the forward pass with grad enabled")
    if loss.dtype == torch.float16 or (isinstance(outputs, torch.Tensor) and outputs.dtype == torch.float16):
        # A GradScaler would scale the first pass's gradient, and with it the perturbation
        # direction's norm and the kept logit gradient: refuse instead of silently mis-scaling.
        raise ValueError("float16 training with a gradient scaler is not supported by the two-pass "
                         "optimizers; use bfloat16 autocast (no scaler needed) or float32")


def global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """‖(t_1, …, t_n)‖₂ as a 0-d tensor on the first tensor's device (no host sync)."""
    norms = torch._foreach_norm(tensors)
    device = tensors[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


class PassOptimizer(torch.optim.Optimizer):
    """Base of the SAM family and Nexus; see the module docstring for the protocol.

    ``model``: the module as trained (a DDP or FSDP2 wrapper included). With it, under DDP
    passes other than the last skip the gradient all-reduce (FSDP2 reduces in every pass), and (where a subclass asks for it)
    buffers such as BatchNorm statistics are updated by the first pass only.
    ``grad_clip``: clip the global norm of the final gradient (never of an intermediate one)
    to this before the base step; 0 turns it off. Leave it 0 when the caller clips.
    """

    repeat_passes = True  # SAM family: every pass sees the same batch, dropout masks and buffers
    sync_every_pass = False  # all-reduce gradients in every pass, not only the last

    def __init__(self, params, base_optimizer: Callable[..., torch.optim.Optimizer], defaults: dict[str, Any],
                 base_kwargs: dict[str, Any], *, model: torch.nn.Module | None = None, grad_clip: float = 0.0):
        if not callable(base_optimizer):
            raise TypeError("base_optimizer must be an optimizer class such as torch.optim.AdamW")
        if grad_clip < 0 or not math.isfinite(grad_clip):
            raise ValueError(f"grad_clip must be 0 (off) or a positive norm, got {grad_clip}")
        super().__init__(params, defaults)
        self.base = base_optimizer(self.param_groups, **base_kwargs)
        # One set of groups and one state: the base optimizer's.
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.defaults = {**self.base.defaults, **defaults}
        self.model = model
        self.grad_clip = float(grad_clip)
        self.steps = 0  # completed steps (the ρ warm-up and γ schedule read it)
        self.last_loss: torch.Tensor | None = None  # loss of the first pass of the last step
        self._stats: dict[str, Any] = {}  # diagnostics of the last step (tensors until read)
        self._origin: list[torch.Tensor] | None = None
        self._moved = False  # parameters are away from the saved θ
        self._phase: int | None = None
        self._ready = False

    # -- what subclasses define

    @property
    def num_passes(self) -> int:
        raise NotImplementedError

    def _backward(self, k: int, outputs: torch.Tensor, loss: torch.Tensor) -> None:
        """Pass ``k``: backward, and move the parameters for the next pass."""
        raise NotImplementedError

    def _before_base_step(self) -> None:
        """After the last pass, before θ is restored: leave the final gradient in ``.grad``."""

    # -- helpers for subclasses

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    def _save_origin(self) -> None:
        params = self._params()
        with torch.no_grad():
            if self._origin is None or len(self._origin) != len(params) or any(
                    o.shape != p.shape or o.dtype != p.dtype or o.device != p.device
                    for o, p in zip(self._origin, params)):
                self._origin = [p.detach().clone() for p in params]
            else:
                for o, p in zip(self._origin, params):
                    o.copy_(p)
        self._moved = False

    def _restore_origin(self) -> None:
        if self._moved:
            with torch.no_grad():
                for o, p in zip(self._origin, self._params()):
                    p.copy_(o)
            self._moved = False

    def _zero_grads(self) -> None:
        for p in self._params():
            p.grad = None

    # -- the protocol

    @contextmanager
    def _sync(self, last: bool) -> Iterator[None]:
        """Skip DDP's gradient all-reduce in a pass that is not the last (around its forward
        and backward both: DDP decides in forward whether backward will reduce).

        FSDP2 models reduce in every pass: without the reduce-scatter, FSDP2 keeps the
        pass's gradient in an unsharded buffer of its own (the sharded ``.grad`` the
        perturbation reads stays None) and adds it into the next pass's reduction. Each
        pass then sees the global-batch gradient, as a single process does."""
        model = self.model
        if last or self.sync_every_pass or model is None or not hasattr(model, "no_sync"):
            yield
        else:
            with model.no_sync():
                yield

    def passes(self) -> Iterator[int]:
        """Yields the pass index k = 0 .. num_passes−1; call ``backward`` once inside each."""
        if self._phase is not None:
            raise RuntimeError("a step is already in progress: finish its passes and call step() first")
        self._ready = False
        self._zero_grads()
        self._save_origin()
        n = self.num_passes
        rng_at_start = rng_states()
        rng_after_first = None
        buffers = None
        try:
            for k in range(n):
                self._phase = k
                if k > 0 and self.repeat_passes:
                    # The same dropout masks in every pass; buffers as the first pass left them.
                    restore_rng_states(rng_at_start)
                    if buffers is None and self.model is not None:
                        buffers = [b.detach().clone() for b in self.model.buffers()]
                with self._sync(last=k == n - 1):
                    yield k
                if self._phase != k + 1:
                    raise RuntimeError("call optimizer.backward(outputs, loss) exactly once in every pass")
                if k == 0 and self.repeat_passes and n > 1:
                    rng_after_first = rng_states()
            self._before_base_step()
            self._restore_origin()
            self._ready = True
        finally:
            self._restore_origin()
            if buffers is not None:
                with torch.no_grad():
                    for saved, b in zip(buffers, self.model.buffers()):
                        b.copy_(saved)
            if rng_after_first is not None:
                restore_rng_states(rng_after_first)  # as one ordinary forward would leave it
            self._phase = None

    def backward(self, outputs: torch.Tensor, loss: torch.Tensor) -> None:
        """Backward of the current pass (inside ``passes()``), with grad enabled."""
        k = self._phase
        if k is None:
            raise RuntimeError("backward() belongs inside `for k in optimizer.passes():`")
        if k >= self.num_passes:
            raise RuntimeError("backward() was already called in this pass")
        _check_outputs(outputs, loss)
        if k == 0:
            self.last_loss = loss.detach()
        with torch.enable_grad():
            self._backward(k, outputs, loss)
        self._phase = k + 1

    @torch.no_grad()
    def _clip(self) -> None:
        if self.grad_clip > 0:
            grads = [p for p in self._params() if p.grad is not None]
            if grads:
                self._stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(grads, self.grad_clip)

    def step(self, closure: Closure | None = None):
        """With a closure: all passes, then the base update; returns the first pass's loss.
        Without: the base update after ``passes()`` built the gradient."""
        if closure is not None:
            with torch.enable_grad():
                for _ in self.passes():
                    outputs, loss = closure()
                    self.backward(outputs, loss)
        elif not self._ready:
            raise RuntimeError(f"{type(self).__name__} builds its gradient from several passes: call "
                               "step(closure), or run `for k in opt.passes(): ...; opt.backward(outputs, loss)` "
                               "before step()")
        self._ready = False
        self._clip()
        self.base.step()
        self.steps += 1
        return self.last_loss if closure is not None else None

    @property
    def stats(self) -> dict[str, float]:
        """Diagnostics of the last step as floats (read lazily: no device sync in the step)."""
        return {key: float(value) for key, value in self._stats.items()}

    # -- torch.optim.Optimizer surface

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not hasattr(self, "base"):  # during torch's own __init__
            return super().add_param_group(param_group)
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        self.base.add_param_group(param_group)
        self.param_groups = self.base.param_groups

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict(), "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "base" not in state_dict:
            raise ValueError(f"not a {type(self).__name__} state dict (no 'base' entry); it was saved by "
                             "another optimizer")
        self.base.load_state_dict(state_dict["base"])
        self.param_groups = self.base.param_groups
        self.state = self.base.state
        self.steps = int(state_dict.get("steps", 0))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={type(self.base).__name__}, {self._describe()})"

    def _describe(self) -> str:
        return ""
