"""Snapshot and restore everything a measurement could disturb.

Measurement must never perturb training: after any curvature call the parameters,
buffers, ``.grad`` tensors, train/eval flags of every module and the global RNG states
are bit-identical to before, whether the call returned, raised, or met a NaN. The guard
below takes one copy of the parameters on entry; the line search reuses that copy as its
origin, so the guard costs no extra memory there.

A model sharded with FSDP2 is guarded through its sharded parameters (each rank copies
and restores its own shards, grads and buffers); it is resharded on entry and on exit,
so it comes back with the sharded parameters registered and its next forward
all-gathers the restored values (see ``fsdp``).
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch

from . import fsdp

__all__ = ["StateGuard", "OptimizerStateGuard", "restore_rng_states", "rng_states", "trainable_parameters", "unwrap_model"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper.

    Measurements run forward and backward passes through the bare module and do their own
    all-reduce: going through DDP's reducer would leave it expecting a gradient sync that
    never comes, and training would fail on its next step.
    """
    inner = model
    while isinstance(inner, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
        inner = inner.module
    _refuse_flat_parameter_fsdp(inner)
    return inner


def _refuse_flat_parameter_fsdp(model: torch.nn.Module) -> None:
    # The FSDP1 wrapper flattens parameters into FlatParameters: directions could not be
    # aligned with the model's parameters, and measuring would be silently wrong.
    if fsdp.is_flat_parameter_fsdp(model):
        raise TypeError(
            "models wrapped in FullyShardedDataParallel (FSDP1) are not supported; shard "
            "them with torch.distributed.fsdp.fully_shard (FSDP2) instead"
        )


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters that require grad, in ``model.parameters()`` order (the direction's order).

    For an FSDP2 model these are the sharded DTensor parameters (the optimizer's): the
    model is resharded first, since after a forward its root holds the full ones.
    """
    inner = unwrap_model(model)
    fsdp.reshard(inner)
    return [p for p in inner.parameters() if p.requires_grad]


def rng_states() -> dict:
    states = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states:
        torch.cuda.set_rng_state_all(states["cuda"])


class StateGuard:
    """Context manager: on exit, put the model back exactly as it was on entry.

    ``mode`` is the train/eval mode the model is put in for the measurement: "eval"
    (default: no dropout, BatchNorm uses its running statistics), "train", or None to
    leave it as it is. ``.params`` is the entry copy of the trainable parameters, in
    direction order; callers may read it but must not write to it.
    """

    def __init__(self, model: torch.nn.Module, *, mode: str | None = "eval"):
        if mode not in ("eval", "train", None):
            raise ValueError(f"mode must be 'eval', 'train' or None, not {mode!r}")
        self.model = unwrap_model(model)
        self.mode = mode
        self.params: list[torch.Tensor] = []

    def __enter__(self) -> "StateGuard":
        model = self.model
        fsdp.reshard(model)
        self._forward_order = fsdp.ForwardOrder(model)
        self._trainable = trainable_parameters(model)
        self._all_params = list(model.parameters())
        self._requires_grad = [p.requires_grad for p in self._all_params]
        with torch.no_grad():
            self.params = [p.detach().clone() for p in self._trainable]
            self._frozen = [p.detach().clone() for p in self._all_params if not p.requires_grad]
            # Buffers by owner and name: a forward may rebind a buffer attribute
            # (``self.running = 0.9 * self.running + ...``) or register a new one.
            self._buffers = {
                module: {
                    name: (b, None if b is None else b.detach().clone())
                    for name, b in module._buffers.items()
                }
                for module in model.modules()
            }
        self._grads = [
            (p.grad, None if p.grad is None else p.grad.detach().clone()) for p in self._all_params
        ]
        self._modes = [(m, m.training) for m in model.modules()]
        self._rng = rng_states()
        self._grad_enabled = torch.is_grad_enabled()
        if self.mode == "eval":
            model.eval()
        elif self.mode == "train":
            model.train()
        return self

    def restore_parameters(self) -> None:
        """Write the entry values back into the trainable parameters (in place)."""
        with torch.no_grad():
            for p, saved in zip(self._trainable, self.params):
                p.copy_(saved)

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            fsdp.recover(self.model)
        else:
            fsdp.reshard(self.model)
        self._forward_order.restore()
        with torch.no_grad():
            self.restore_parameters()
            frozen = iter(self._frozen)
            for p, trainable in zip(self._all_params, self._requires_grad):
                if not trainable:
                    p.copy_(next(frozen))
            for module, buffers in self._buffers.items():
                for name in list(module._buffers):
                    if name not in buffers:
                        del module._buffers[name]
                for name, (ref, saved) in buffers.items():
                    if ref is not None:
                        ref.copy_(saved)
                    module._buffers[name] = ref
        for p, flag in zip(self._all_params, self._requires_grad):
            p.requires_grad_(flag)
        for p, (ref, saved) in zip(self._all_params, self._grads):
            if ref is None:
                p.grad = None
            else:
                # Keep the same tensor object: fused optimizers and hooks may hold it.
                with torch.no_grad():
                    ref.copy_(saved)
                p.grad = ref
        for module, flag in self._modes:
            module.training = flag
        restore_rng_states(self._rng)
        torch.set_grad_enabled(self._grad_enabled)


class OptimizerStateGuard:
    """Snapshot an optimizer's state and param-group settings; restore them in place.

    Used where a measurement has to call ``optimizer.step()`` to learn the update direction
    (relative critical sharpness with an optimizer): the step is undone exactly, including
    state entries it created (Adam's moments appear on the first step).
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    @staticmethod
    def _copy(value):
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return {k: OptimizerStateGuard._copy(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(OptimizerStateGuard._copy(v) for v in value)
        return value

    def __enter__(self) -> "OptimizerStateGuard":
        opt = self.optimizer
        self._state = {p: (dict(s), self._copy(s)) for p, s in opt.state.items()}
        self._groups = [
            {k: self._copy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups
        ]
        return self

    def __exit__(self, *exc) -> None:
        opt = self.optimizer
        for p in list(opt.state.keys()):
            if p not in self._state:
                del opt.state[p]
        for p, (refs, saved) in self._state.items():
            current = opt.state[p]
            for key in list(current.keys()):
                if key not in saved:
                    del current[key]
            for key, value in saved.items():
                ref = refs.get(key)
                if (
                    isinstance(ref, torch.Tensor)
                    and isinstance(value, torch.Tensor)
                    and ref.shape == value.shape
                    and ref.dtype == value.dtype
                ):
                    with torch.no_grad():
                        ref.copy_(value)
                    current[key] = ref
                else:
                    current[key] = value
        for group, saved in zip(opt.param_groups, self._groups):
            for key in list(group.keys()):
                if key != "params" and key not in saved:
                    del group[key]
            group.update(saved)


@contextmanager
def preserved(model: torch.nn.Module, *, mode: str | None = "eval") -> Iterator[StateGuard]:
    with StateGuard(model, mode=mode) as guard:
        yield guard
