"""Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

fully_shard turns each parameter into a DTensor holding this rank's shard and swaps, per
sharded module, between those sharded parameters and all-gathered full ones:

* a forward all-gathers a module's parameters and registers the full ones on it; every
  module but the root gives them back (reshards) after its forward, and a backward
  reshards the rest. After a forward under ``no_grad`` the root keeps its full
  parameters, and its next forward does not all-gather again. A measurement that
  writes θ − η·d into the shards must therefore reshard before each forward, or the
  forward would see the parameters of the previous probe.
* ``model.parameters()`` yields whatever is registered at the moment. The sharded
  parameters are the ones the optimizer holds and the ones directions are aligned
  with, so we reshard before reading them.
* FSDP2's backward reduce-scatters gradients into ``.grad`` and frees the full
  parameters, so the graph a double backward (H·v) runs through would be freed under
  it. For gradients and H·v the model is instead held unsharded with gradient
  reduction and resharding switched off (:class:`FullParameters`): autograd then runs
  on the full tensors exactly as on a replicated (DDP) model, the results are averaged
  over ranks by the caller like DDP's, and each rank keeps its own shard of them. This
  costs the memory of the full parameters on every rank while it is open.

Vectors (directions, Lanczos bases, probes) stay DTensors sharded like the parameters;
their reductions are in :mod:`.vectors`.

FSDP2 internals are read where FSDP2 has setters but no getters, each use marked
"internal": a module's parameter groups and root flag, the root's lazy initialisation,
the per-group settings saved and restored, and the record of the forward order. A torch
release that renames them breaks tests/test_curvature_fsdp.py rather than measurements.
"""

from __future__ import annotations

import contextlib
import math
import sys
import weakref
from typing import Iterator, Sequence

import torch

__all__ = ["FullParameters", "distribute_tensor", "fsdp_modules", "full_parameters", "is_dtensor", "recover", "reshard"]


# FSDP2 and DTensor are looked up, not imported: importing them costs most of a second
# on every start (the CLI's included), and a model or tensor of theirs can only exist
# once its creator has imported them.
def _loaded(module: str, name: str):
    return getattr(sys.modules.get(module), name, None)


def is_dtensor(t) -> bool:
    cls = _loaded("torch.distributed.tensor", "DTensor")
    return cls is not None and isinstance(t, cls)


def distribute_tensor(*args, **kwargs):
    from torch.distributed.tensor import distribute_tensor as distribute

    return distribute(*args, **kwargs)


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The fully_shard-ed modules inside ``model`` (itself included), in modules() order."""
    cls = _loaded("torch.distributed.fsdp", "FSDPModule")
    if cls is None:
        return []
    return [m for m in model.modules() if isinstance(m, cls)]


def is_flat_parameter_fsdp(model: torch.nn.Module) -> bool:
    """Whether ``model`` is wrapped in the FSDP1 ``FullyShardedDataParallel``."""
    cls = _loaded("torch.distributed.fsdp", "FullyShardedDataParallel")
    return cls is not None and isinstance(model, cls)


# FSDP param-group attributes that FullParameters changes (through the public setters)
# and puts back; the state attribute is flipped by set_reshard_after_forward.
_GROUP_SETTINGS = ("post_forward_mesh_info", "reshard_after_backward", "reduce_grads", "all_reduce_grads")
_STATE_SETTINGS = ("_auto_reshard_after_forward",)


# Models whose full parameters are being held (FullParameters open), by identity.
_held: "weakref.WeakKeyDictionary[torch.nn.Module, FullParameters]" = weakref.WeakKeyDictionary()


def reshard(model: torch.nn.Module, modules: Sequence[torch.nn.Module] | None = None) -> None:
    """Register the sharded parameters on every fully_shard-ed module (freeing the
    all-gathered ones), so that parameters() yields the shards and the next forward
    all-gathers what the shards hold now. A no-op while FullParameters holds the model."""
    if model in _held:
        return
    for m in fsdp_modules(model) if modules is None else modules:
        m.reshard()


def _param_groups(modules):
    for m in modules:
        yield from m._get_fsdp_state()._fsdp_param_groups  # internal: no public accessor


class ForwardOrder:
    """FSDP records the order of forwards (for backward prefetching) and clears it only at
    the end of a backward; the forwards of a measurement are put out of that record."""

    def __init__(self, model: torch.nn.Module):
        self._saved = []
        try:
            modules = fsdp_modules(model)
            # Before the first forward every group has a record of its own; the root's
            # lazy initialisation replaces them by a shared one, so it happens first.
            _lazy_init_roots(modules)
            groups = list(_param_groups(modules))
            contexts = {id(g.comm_ctx): g.comm_ctx for g in groups}.values()
            for owner, name in [(g, "_post_forward_indices") for g in groups] + [  # internal
                (c, "post_forward_order") for c in contexts
            ]:
                record = getattr(owner, name)
                self._saved.append((record, list(record)))
        except AttributeError:  # another FSDP2 layout: prefetching is an optimisation only
            self._saved = []

    def restore(self) -> None:
        for record, saved in self._saved:
            record[:] = saved


def recover(model: torch.nn.Module) -> None:
    """After an error inside a forward or backward: FSDP's own recovery on each root
    (waits, reshards, clears per-iteration state), else a plain reshard."""
    _held.pop(model, None)
    for m in fsdp_modules(model):
        state = m._get_fsdp_state()  # internal: which modules are roots
        if getattr(state, "_is_root", False) and hasattr(m, "reset_iter_state"):
            m.reset_iter_state()
        else:
            m.reshard()


class FullParameters:
    """The model held unsharded for autograd: ``full[i]`` is the full tensor that stands
    for the sharded parameter ``sharded[i]`` in forward and backward passes.

    ``gather`` turns sharded vectors into full ones and ``shard`` full ones into this
    rank's shards (no communication: every rank holds the same full tensor by then). For
    a model without fully_shard-ed modules both are the identity and ``full`` is
    ``sharded``.
    """

    def __init__(self, sharded: Sequence[torch.Tensor], full: Sequence[torch.Tensor]):
        self.sharded = list(sharded)
        self.full = list(full)

    def gather(self, vector: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Whole tensors from sharded ones: one all-gather per mesh and dtype for the
        row-sharded tensors of a one-dimensional mesh (FSDP's layout), ``full_tensor()``
        for any other layout."""
        vector = list(vector)
        out: list[torch.Tensor | None] = [None] * len(vector)
        buckets: dict = {}
        for i, v in enumerate(vector):
            if not is_dtensor(v):
                out[i] = v
            elif _row_sharded(v):
                local = v.to_local()
                buckets.setdefault((v.device_mesh, local.dtype, local.device), []).append(i)
            else:
                out[i] = v.full_tensor()
        for (mesh, _, _), indices in buckets.items():
            for i, whole in zip(indices, _gather_rows(mesh, [vector[i] for i in indices])):
                out[i] = whole
        return [v.to(dtype=f.dtype) for v, f in zip(out, self.full, strict=True)]

    def shard(self, full: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for f, p in zip(full, self.sharded, strict=True):
            if is_dtensor(p):
                # Every rank holds the same full tensor (reduced over ranks), so taking
                # the local chunk needs no communication (src_data_rank=None).
                f = distribute_tensor(f.to(dtype=p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            out.append(f)
        return out


def _row_sharded(v) -> bool:
    """Whether DTensor ``v`` is split by rows (Shard(0)) over a one-dimensional mesh."""
    from torch.distributed.tensor import Shard

    placements = v.placements
    return v.device_mesh.ndim == 1 and v.dim() > 0 and type(placements[0]) is Shard and placements[0].dim == 0


def _gather_rows(mesh, vectors: list) -> list[torch.Tensor]:
    """The whole tensors of row-sharded DTensors with one all-gather.

    Rows are split as torch.chunk splits them: ⌈n/world⌉ rows per rank, the last ranks
    holding fewer or none. Each rank pads its shards to that size and sends them in one
    buffer, so every rank's buffer has the same layout; the padding is dropped on return.
    """
    import torch.distributed as dist

    world = mesh.size()
    layout = []  # (rows per rank, elements per row) of each tensor
    pieces = []
    for v in vectors:
        n, row = v.shape[0], math.prod(v.shape[1:])
        per_rank = -(-n // world)
        local = v.to_local().reshape(-1)
        pieces.append(local)
        pad = per_rank * row - local.numel()
        if pad:
            pieces.append(local.new_zeros(pad))
        layout.append((per_rank, row))
    send = torch.cat(pieces)
    received = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(received, send, group=mesh.get_group())
    out, offset = [], 0
    for v, (per_rank, row) in zip(vectors, layout):
        size = per_rank * row
        rows = [r[offset : offset + size].view(per_rank, row) for r in received]
        whole = torch.cat(rows)[: v.shape[0]].reshape(v.shape)
        out.append(whole)
        offset += size
    return out


def _lazy_init_roots(modules) -> None:
    # internal: FSDP decides which module is the root on the first forward and then sets
    # the root's reshard-after-forward to False. Deciding it now, the way that forward
    # would, keeps the settings saved below equal to what training runs with.
    for m in modules:
        state = m._get_fsdp_state()
        if state._is_root is None:
            state._lazy_init()


@contextlib.contextmanager
def full_parameters(model: torch.nn.Module, params: Sequence[torch.Tensor]) -> Iterator[FullParameters]:
    """Hold ``model`` unsharded while the block runs (re-entrant); see the module doc.

    ``params`` are the trainable (sharded) parameters in parameters() order. Inside,
    FSDP's forward and backward hooks neither reshard nor reduce gradients, so graphs
    built on the full parameters survive any number of backward passes.
    """
    modules = fsdp_modules(model)
    if not modules:
        yield FullParameters(params, params)
        return
    held = _held.get(model)
    if held is not None:  # nested: the outermost block owns the unsharded state
        yield held
        return
    _lazy_init_roots(modules)
    reshard(model, modules)
    sharded = [p for p in model.parameters() if p.requires_grad]
    if len(sharded) != len(params) or any(a is not b for a, b in zip(sharded, params)):
        raise RuntimeError("full_parameters needs the model's trainable parameters, in parameters() order")
    groups = list(_param_groups(modules))
    states = [m._get_fsdp_state() for m in modules]  # internal: settings have no getters
    saved = [(g, {k: getattr(g, k) for k in _GROUP_SETTINGS}) for g in groups]
    saved += [(s, {k: getattr(s, k) for k in _STATE_SETTINGS}) for s in states]
    failed = False
    try:
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
            m.set_reshard_after_backward(False, recurse=False)
            m.set_requires_gradient_sync(False, recurse=False)
        for m in modules:
            m.unshard()
        full = [p for p in model.parameters() if p.requires_grad]
        if [tuple(f.shape) for f in full] != [tuple(p.shape) for p in sharded]:
            raise RuntimeError("FSDP2 registered full parameters that do not match its shards")
        view = FullParameters(sharded, full)
        _held[model] = view
        yield view
    except BaseException:
        failed = True
        raise
    finally:
        _held.pop(model, None)
        for owner, values in saved:
            for k, v in values.items():
                setattr(owner, k, v)
        if failed:
            recover(model)
        else:
            reshard(model, modules)
