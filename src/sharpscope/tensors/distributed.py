"""torch.distributed participation: every rank takes the same decisions.

Each rank evaluates the loss on its own shard of the global batch; losses and
Hessian-vector products are averaged over ranks, so the global objective is the mean over
ranks (shards of equal size give exactly the loss of the global batch). The line search
and the solvers then branch on identical numbers on every rank.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

import torch
import torch.distributed as dist


def resolve_group(distributed: bool | str, group=None):
    """The process group to reduce over, or None for a single-process measurement."""
    if distributed not in (True, False, "auto"):
        raise ValueError(f"distributed must be True, False or 'auto', not {distributed!r}")
    initialized = dist.is_available() and dist.is_initialized()
    if distributed is True and not initialized:
        raise ValueError(
            "distributed=True but torch.distributed is not initialized; call "
            "torch.distributed.init_process_group first or pass distributed=False"
        )
    if distributed is False or not initialized:
        return None
    if dist.get_world_size(group) == 1:
        return None
    return group if group is not None else dist.group.WORLD


def world_size() -> int:
    """Processes in the default group (1 when torch.distributed is not initialized)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank(group) -> int:
    """This process's rank in ``group`` (0 for a single-process measurement)."""
    return 0 if group is None else dist.get_rank(group)


def _reduce_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def mean_floats(values: Sequence[float], group) -> list[float]:
    """Average host floats over the ranks of ``group`` (identity when group is None)."""
    values = [float(v) for v in values]
    if group is None:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_reduce_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    t /= dist.get_world_size(group)
    return [float(x) for x in t.cpu()]


def mean_tensors_(tensors: Sequence[torch.Tensor], group) -> None:
    """Average tensors over ranks in place.

    Tensors of one device and dtype travel in one flat buffer: one all-reduce per
    product instead of one per parameter tensor (the latency of a collective is paid once).
    """
    if group is None:
        return
    world = dist.get_world_size(group)
    buckets: dict = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    for bucket in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat.div_(world)
        offset = 0
        for t in bucket:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def gather_arrays(arrays: list[np.ndarray] | None, group) -> list[np.ndarray] | None:
    """Every rank's list of host arrays, concatenated rank-major, on every rank (the list
    itself when group is None). Sizes may differ between ranks."""
    if group is None or arrays is None:
        return arrays
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, arrays, group=group)
    return [a for part in gathered for a in part]
