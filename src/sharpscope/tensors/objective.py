"""Evaluating the measured objective: the mean loss over one or several batches.

Every curvature routine goes through here so that batches, autocast, dropout masks and
ranks are handled once:

* ``batches``: a Python ``list`` means several batches and the objective is their
  unweighted mean; anything else (a tensor, a tuple ``(x, y)``, a dict) is one batch.
* ``autocast``: a dtype such as ``torch.bfloat16`` runs ``loss_fn`` under
  ``torch.autocast``; the loss is cast to float32 and the mean taken in float64.
  ``None`` means full precision, whatever the caller's context: autocast is switched off
  for the evaluation, and a ``forward`` that a framework wrapped in autocast (accelerate,
  and so the Hugging Face Trainer with ``bf16=True``, replaces ``model.forward`` by an
  autocast wrapper and keeps the original as ``_original_forward``) is bypassed while the
  measurement runs, so the precision is the one asked for, not the one training happens
  to use.
* In train mode (dropout active) every evaluation of batch ``i`` reseeds the RNG with
  ``seed + i`` (``i`` counted over the global batch, rank-major) so that every probe sees the same dropout masks, which makes the loss a
  deterministic function of the parameters. The caller's RNG state is restored by the
  state guard.
* Attention runs on the math kernel whenever derivatives of derivatives are taken: the
  flash and memory-efficient kernels have neither double backward nor forward-mode AD.
* A model sharded with FSDP2 is resharded before and after each forward-only evaluation
  (its root keeps the full parameters after a forward, and would not all-gather the next
  probe's values), and its gradients are taken on the full parameters and cut to this
  rank's shards (see ``fsdp``).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import fsdp
from .distributed import gather_arrays, mean_floats, mean_tensors_, rank, resolve_group, world_size

LossFn = Callable[[torch.nn.Module, Any], torch.Tensor]


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision tensors (autocast outputs), anything else unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def as_batch_list(batches: Any) -> list:
    if isinstance(batches, list):
        if not batches:
            raise ValueError("batches is an empty list; give at least one batch")
        return batches
    return [batches]


@contextlib.contextmanager
def unwrapped_forward(model: torch.nn.Module):
    """Run with the forward a framework's mixed-precision wrapper replaced (see the module
    notes); the wrapper object is put back afterwards, exactly as it was."""
    wrapped = [m for m in model.modules()
               if "forward" in m.__dict__ and m.__dict__.get("_original_forward") is not None]
    saved = [m.__dict__["forward"] for m in wrapped]
    try:
        for m in wrapped:
            m.forward = m.__dict__["_original_forward"]
        yield
    finally:
        for m, forward in zip(wrapped, saved):
            m.forward = forward


def precision_of(model: torch.nn.Module, autocast: torch.dtype | None) -> str:
    """What a measurement computes in: the autocast dtype, or the parameters' dtype."""
    if autocast is not None:
        return f"autocast {str(autocast).removeprefix('torch.')}"
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    return "+".join(dtypes) or "float32"


def device_types(model: torch.nn.Module) -> list[str]:
    """The device types holding the model's parameters (a model may span CPU and GPUs)."""
    types = sorted({p.device.type for p in model.parameters()})
    return types or ["cpu"]


class Objective:
    """The measured objective L(θ) = mean_i loss_fn(model, batches[i]), over all ranks."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: LossFn,
        batches: Any,
        *,
        autocast: torch.dtype | None = None,
        seed: int = 0,
        distributed: bool | str = "auto",
        process_group=None,
    ):
        if not callable(loss_fn):
            raise TypeError("loss_fn must be a callable loss_fn(model, batch) -> 0-dim tensor "
                            "(or 1-D per-example losses)")
        self.model = model
        self.loss_fn = loss_fn
        self.batches = as_batch_list(batches)
        self.autocast = autocast
        self.seed = int(seed)
        self.group = resolve_group(distributed, process_group)
        self.sharded = bool(fsdp.fsdp_modules(model))
        if self.sharded and self.group is None and world_size() > 1:
            raise ValueError(
                "the model is sharded with fully_shard: its forward passes are collective, so "
                "every rank must take part in the measurement and the loss is the mean over "
                "ranks; distributed=False is not possible"
            )
        # Dropout seeds follow a batch's position in the global batch (rank-major), so a
        # sharded measurement sees the masks the single-process one sees on the same
        # global batch (this assumes every rank holds the same number of batches).
        self._seed_base = self.seed + rank(self.group) * len(self.batches)
        self.calls = 0
        self.examples: list[np.ndarray] | None = None

    @contextlib.contextmanager
    def _context(self, index: int, second_order: bool):
        with contextlib.ExitStack() as stack:
            if self.model.training:
                cuda = sorted({p.device.index or 0 for p in self.model.parameters() if p.device.type == "cuda"})
                stack.enter_context(torch.random.fork_rng(devices=cuda))
                torch.manual_seed(self._seed_base + index)
            # The precision asked for, not the one of the caller's context or of a wrapped
            # forward: one autocast region per device type (a model spread over CPU and a
            # GPU runs every part in the asked dtype), switched off when autocast is None.
            stack.enter_context(unwrapped_forward(self.model))
            for device_type in device_types(self.model):
                if self.autocast is not None:
                    stack.enter_context(torch.autocast(device_type=device_type, dtype=self.autocast))
                else:
                    stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            if second_order:
                stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
            yield

    def _output(self, index: int, second_order: bool) -> torch.Tensor:
        """What ``loss_fn`` returns for batch ``index``: a 0-dim loss or a 1-D tensor of
        per-example losses, in full precision."""
        with self._context(index, second_order):
            out = self.loss_fn(self.model, self.batches[index])
        if not isinstance(out, torch.Tensor) or out.dim() > 1 or (out.dim() == 1 and out.numel() == 0):
            raise TypeError(
                "loss_fn must return a 0-dim tensor (the mean loss of the batch) or a 1-D tensor of "
                "per-example losses, got "
                + (f"a tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__)
            )
        return full_precision(out)

    def loss(self, index: int, *, second_order: bool = False) -> torch.Tensor:
        """The differentiable loss of batch ``index`` (local to this rank): the mean of the
        per-example losses when ``loss_fn`` returns them."""
        out = self._output(index, second_order)
        return out.mean() if out.dim() == 1 else out

    def batch_mean_(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sums over this rank's batches → the mean over batches and ranks, in place."""
        for t in tensors:
            t.div_(len(self.batches))
        mean_tensors_(tensors, self.group)
        return tensors

    def local_gradient_sum(self, params: list[torch.Tensor], *, second_order: bool = False) -> list[torch.Tensor]:
        """Σ over this rank's batches of ∇loss_i with respect to the tensors ``params`` that
        the forward uses (for a sharded model: the full parameters)."""
        out = [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            for i in range(len(self.batches)):
                parts = torch.autograd.grad(self.loss(i, second_order=second_order), params, allow_unused=True)
                for acc, g in zip(out, parts):
                    if g is not None:
                        acc.add_(g.detach())
        return out

    def gradient(self, params: list[torch.Tensor], *, second_order: bool = False) -> list[torch.Tensor]:
        """∇L over all batches and ranks, by ``autograd.grad`` (``.grad`` is never touched);
        zero for parameters the loss does not use. ``params`` are the model's trainable
        parameters; for a sharded model the result is sharded like them."""
        with fsdp.full_parameters(self.model, params) as view:
            return view.shard(self.batch_mean_(self.local_gradient_sum(view.full, second_order=second_order)))

    def value(self) -> float:
        """L(θ) at the model's current parameters, forward passes only (float64 mean).

        When ``loss_fn`` returns per-example losses, ``examples`` then holds them for this
        evaluation: one float64 array per batch, for the batches of every rank (rank-major),
        so that a statistic over examples (the critical-sharpness bootstrap) sees the whole
        global batch and is the same on every rank. None when ``loss_fn`` returns a mean.
        """
        self.calls += 1
        total = 0.0
        cells: list[np.ndarray] | None = []
        if self.sharded:
            fsdp.reshard(self.model)
        with torch.no_grad():
            for i in range(len(self.batches)):
                out = self._output(i, False)
                if out.dim() == 1 and cells is not None:
                    values = out.detach().double().cpu().numpy()
                    cells.append(values)
                    total += float(values.mean())
                else:
                    cells = None
                    total += float(out.double().mean())
        if self.sharded:
            fsdp.reshard(self.model)
        local = total / len(self.batches)
        # Every rank must take part in the gather, so the decision is collective too.
        per_example = mean_floats([float(cells is not None)], self.group)[0] == 1.0
        self.examples = gather_arrays(cells, self.group) if per_example else None
        return mean_floats([local], self.group)[0]
