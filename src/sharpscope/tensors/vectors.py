"""Vectors in parameter space, kept as lists of tensors shaped like the parameters.

Parameters may live on several devices and in several dtypes, so nothing is flattened:
every reduction is done per tensor and summed on the host in float64.

For a model sharded with FSDP2 the parameters, and so the vectors, are DTensors: each
rank holds a shard. Elementwise operations act on the shards. A sum (dot, norm, the
non-finite check) adds the local sums of each DTensor over its device mesh, counting a
placement that is replicated along a mesh dimension once (the copy at coordinate 0 of
that dimension), so every rank gets the sum over the global tensor; plain tensors are
whole on every rank and are summed locally. Random vectors are drawn whole and then cut
to the local shard, so they do not depend on the number of ranks.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .fsdp import distribute_tensor, is_dtensor

Vector = list[torch.Tensor]


def _local(x: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``x`` (``x`` itself unless it is a DTensor), for reading.

    The DTensor's own local tensor rather than ``to_local()``: the latter goes through an
    autograd function (tens of microseconds), and the Lanczos basis is read tensor by
    tensor thousands of times per solve.
    """
    if not is_dtensor(x):
        return x
    local = getattr(x, "_local_tensor", None)
    return x.to_local() if local is None else local


def _counts_once(x) -> bool:
    """Whether this rank's local part of DTensor ``x`` enters a sum over the mesh."""
    mesh = x.device_mesh
    for dim, placement in enumerate(x.placements):
        if placement.is_partial():
            raise ValueError("vectors with Partial placements are not supported; redistribute them first")
        if placement.is_replicate() and mesh.get_local_rank(dim) != 0:
            return False
    return True


def _global_sums(like: Sequence[torch.Tensor], local: list[list[float]]) -> list[list[float]]:
    """Per-tensor sums over whole tensors, from this rank's per-tensor sums.

    ``local[i]`` holds one or more sums over tensor i (several vectors against one, say).
    One all-reduce per device mesh (per mesh dimension) carries the sums of all the
    DTensors on that mesh; every rank issues the same collectives in the same order
    because every rank holds the same list of parameters.
    """
    by_mesh: dict = {}
    for i, x in enumerate(like):
        if is_dtensor(x):
            by_mesh.setdefault(x.device_mesh, []).append(i)
    if not by_mesh:
        return local
    out = list(local)
    for mesh, indices in by_mesh.items():
        rows = [local[i] if _counts_once(like[i]) else [0.0] * len(local[i]) for i in indices]
        device = _local(like[indices[0]]).device
        sums = torch.tensor(rows, dtype=torch.float64, device=device)
        for dim in range(mesh.ndim):
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
        for i, row in zip(indices, sums.tolist()):
            out[i] = row
    return out


def _local_dot(x: torch.Tensor, y: torch.Tensor) -> float:
    if is_dtensor(x) != is_dtensor(y) or (is_dtensor(x) and x.placements != y.placements):
        raise ValueError("vectors are laid out differently (sharded vs whole); align them first")
    return float(torch.sum(_local(x).double() * _local(y).double()))


def dots(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> list[float]:
    """⟨a_i, b_i⟩ for each tensor i (the per-parameter terms of :func:`dot`)."""
    a = list(a)
    local = [[_local_dot(x, y)] for x, y in zip(a, b, strict=True)]
    return [row[0] for row in _global_sums(a, local)]


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    total = 0.0
    for term in dots(a, b):
        total += term
    return total


def dots_with(vectors: Sequence[Sequence[torch.Tensor]], w: Sequence[torch.Tensor]) -> list[float]:
    """[⟨v, w⟩ for v in vectors] with a single reduction across ranks (Gram–Schmidt
    against a whole basis would otherwise cost one collective per basis vector)."""
    w = list(w)
    if not vectors:
        return []
    local = [[_local_dot(v[i], w[i]) for v in vectors] for i in range(len(w))]
    terms = _global_sums(w, local)
    out = []
    for k in range(len(vectors)):
        total = 0.0
        for row in terms:
            total += row[k]
        out.append(total)
    return out


def norm(a: Sequence[torch.Tensor]) -> float:
    return dot(a, a) ** 0.5


def scale(a: Sequence[torch.Tensor], c: float) -> Vector:
    return [x * c for x in a]


def axpy(c: float, x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> Vector:
    """c·x + y as a new vector."""
    return [yi.add(xi, alpha=c) for xi, yi in zip(x, y, strict=True)]


def sub(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> Vector:
    return [x - y for x, y in zip(a, b, strict=True)]


def zeros_like(like: Sequence[torch.Tensor]) -> Vector:
    return [torch.zeros_like(x) for x in like]


def numel(like: Sequence[torch.Tensor]) -> int:
    """Entries of the whole vector (a DTensor counts its global shape)."""
    return sum(x.numel() for x in like)


def is_finite(a: Sequence[torch.Tensor]) -> bool:
    """Whether every entry is finite; under sharding every rank gets the same answer (a
    NaN in one rank's shard must stop all ranks, or they would part ways)."""
    a = list(a)
    if not any(is_dtensor(x) for x in a):
        return all(bool(torch.isfinite(x).all()) for x in a)
    bad = [[float((~torch.isfinite(_local(x))).sum())] for x in a]
    return not any(row[0] for row in _global_sums(a, bad))


def random_like(
    like: Sequence[torch.Tensor], generator: torch.Generator, kind: str = "rademacher"
) -> Vector:
    """A random vector drawn on the CPU from ``generator`` (so every rank and every device
    layout draws the same numbers), then moved to each parameter's device and dtype; a
    sharded parameter gets the local shard of the whole draw."""
    out = []
    for x in like:
        if kind == "rademacher":
            r = torch.randint(0, 2, x.shape, generator=generator, dtype=torch.int8)
            r = r.to(torch.float64).mul_(2).sub_(1)
        elif kind == "normal":
            r = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        else:
            raise ValueError(f"unknown random vector kind {kind!r}")
        if is_dtensor(x):
            r = r.to(device=_local(x).device, dtype=x.dtype)
            out.append(distribute_tensor(r, x.device_mesh, x.placements, src_data_rank=None))
        else:
            out.append(r.to(device=x.device, dtype=x.dtype))
    return out


def _align(v: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``v`` laid out like parameter ``p`` (device, dtype, and sharding)."""
    v = v.detach()
    if is_dtensor(p):
        if is_dtensor(v):
            if v.device_mesh != p.device_mesh or v.placements != p.placements:
                v = v.redistribute(p.device_mesh, p.placements)
            return v.to(dtype=p.dtype)
        # A whole tensor (the same on every rank): keep this rank's shard of it.
        local = _local(p)
        return distribute_tensor(
            v.to(device=local.device, dtype=p.dtype), p.device_mesh, p.placements, src_data_rank=None
        )
    if is_dtensor(v):
        v = v.full_tensor()
    return v.to(device=p.device, dtype=p.dtype)


def check_aligned(vector: Sequence[torch.Tensor], params: Sequence[torch.Tensor], what: str) -> Vector:
    """Validate that ``vector`` matches the trainable parameters tensor by tensor (global
    shapes for sharded parameters) and lay each tensor out like its parameter."""
    vector = list(vector)
    if len(vector) != len(params):
        raise ValueError(
            f"{what} has {len(vector)} tensors but the model has {len(params)} trainable "
            "parameters; give one tensor per parameter with requires_grad, in "
            "model.parameters() order"
        )
    out = []
    for i, (v, p) in enumerate(zip(vector, params)):
        if not isinstance(v, torch.Tensor) or v.shape != p.shape:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(
                f"{what}[{i}] has shape {shape} but parameter {i} has shape {tuple(p.shape)}"
            )
        out.append(_align(v, p))
    return out


def flat_layout(like: Sequence[torch.Tensor]) -> tuple[torch.device, torch.dtype] | None:
    """(device, dtype) when the vector can live in one flat buffer: no DTensor, one device
    and one dtype; None otherwise (sharded, multi-device or mixed-dtype parameters, whose
    vectors stay lists of tensors)."""
    like = list(like)
    if not like or any(is_dtensor(x) for x in like):
        return None
    device, dtype = like[0].device, like[0].dtype
    if any(x.device != device or x.dtype != dtype for x in like):
        return None
    return device, dtype


def flatten(a: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The tensors of a (plain, single-device) vector concatenated into one 1-D tensor."""
    return torch.cat([x.detach().reshape(-1).to(dtype or x.dtype) for x in a])


def unflatten(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> Vector:
    """A 1-D tensor cut into tensors shaped like ``like`` (views when the dtype matches,
    converted to each tensor's dtype otherwise)."""
    like = list(like)
    parts = torch.split(flat, [x.numel() for x in like])
    return [part.view(x.shape).to(x.dtype) for part, x in zip(parts, like, strict=True)]
