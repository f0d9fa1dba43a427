"""Checkpoints: ``checkpoints/step{N:08d}/`` holding ``model.safetensors``,
``optimizer.pt`` and ``train_state.json``.

* Written into a hidden temporary folder and renamed into place, so a checkpoint either
  exists whole or not at all; older ones are pruned only after the new one is in place.
* ``train_state.json`` records the step, tokens seen, the data sampler's position, the
  RNG states, the monitor's warm start, and the SHA-256 of the two weight files, so a
  truncated or corrupted file is detected before anything is loaded.
* Nothing is unpickled beyond ``torch.load(weights_only=True)``.
* A model sharded with FSDP2 (``fully_shard``) is checkpointed as full state dicts:
  :func:`gather_full_state` collects them on rank 0 (every rank calls it), which writes
  the same files with the same names and layout as a single process, so a checkpoint
  loads anywhere (one process, DDP, FSDP, ``sharpscope measure``). ``load_checkpoint(...,
  sharded=True)`` puts full state dicts back into the shards on every rank.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from ..config import from_dict
from ..errors import UserError
from ..runs import atomic_write_text
from .config import TrainConfig

CHECKPOINTS = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"
_NAME = re.compile(r"^step(\d{8})$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rng_state() -> dict[str, Any]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii")}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    def tensor(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int, *, full_state: FullState | None = None) -> Path:
    """Write the checkpoint of ``step`` (on one rank). ``full_state``: the state dicts
    that :func:`gather_full_state` collected from a sharded model, written in place of
    ``model``'s and ``optimizer``'s own."""
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if full_state is None:
        save_model(model, str(tmp / MODEL_FILE))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    else:
        full_state.save_model(tmp / MODEL_FILE)
        torch.save(full_state.optimizer, tmp / OPTIMIZER_FILE)
    record = dict(state, step=step, rng=rng_state(), files={
        MODEL_FILE: _sha256(tmp / MODEL_FILE), OPTIMIZER_FILE: _sha256(tmp / OPTIMIZER_FILE)})
    atomic_write_text(tmp / STATE_FILE, json.dumps(record, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(path: Path) -> dict[str, Any]:
    """The checkpoint's train_state.json, after checking both weight files' checksums."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise UserError(f"'{path}' is not a checkpoint (no {STATE_FILE}); give a checkpoints/stepNNNNNNNN folder")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        files = state["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{state_file} is corrupt or truncated; resume from an earlier checkpoint") from None
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise UserError(f"{file} is missing; the checkpoint is incomplete, resume from an earlier one")
        if _sha256(file) != digest:
            raise UserError(f"{file} is corrupt or truncated (checksum mismatch); resume from an earlier checkpoint")
    return state


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, *,
                    sharded: bool = False) -> dict[str, Any]:
    """Load weights (and optimizer state) in place; returns the train state.

    ``sharded``: ``model`` is sharded with FSDP2 and ``optimizer`` holds its DTensor
    parameters; every rank calls this (the loads are collective) and reads the files.
    """
    path = Path(path)
    state = read_state(path)
    if sharded:
        _load_full_state(path, model, optimizer)
        return state
    try:
        missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise UserError(f"{path / MODEL_FILE} cannot be loaded into this model ({exc}); check the model settings") from None
    if missing or unexpected:
        raise UserError(f"{path / MODEL_FILE} does not match the model (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}); use the run's own config")
    if optimizer is not None:
        try:
            optimizer.load_state_dict(torch.load(path / OPTIMIZER_FILE, weights_only=True))
        except (RuntimeError, ValueError, KeyError, OSError) as exc:
            raise UserError(f"{path / OPTIMIZER_FILE} cannot be loaded ({exc}); check the optimizer settings") from None
    return state


# --------------------------------------------------------------------------- FSDP2: full state dicts


def _tied_names(model: torch.nn.Module) -> list[list[str]]:
    """Groups of parameter names that share one tensor (tied weights), each sorted."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [sorted(names) for names in by_id.values() if len(names) > 1]


def _parameter_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each of the optimizer's parameters, in its state-dict index order
    (groups in order, parameters in order within a group: how ``state_dict()`` numbers
    them). The model must have its sharded parameters registered."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    try:
        return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]
    except KeyError:
        raise RuntimeError("the optimizer holds parameters that the model does not register "
                           "(reshard an FSDP2 model before reading its state)") from None


def _names_to_indices(named: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state dict (torch.distributed.checkpoint's layout) in the
    index-keyed layout that ``optimizer.state_dict()`` writes in a single process."""
    index: dict[str, int] = {}
    groups = []
    for group in named["param_groups"]:
        ids = []
        for name in group["params"]:
            index[name] = len(index)
            ids.append(index[name])
        groups.append({**group, "params": ids})
    state = {index[name]: value for name, value in named["state"].items()}
    return {"state": dict(sorted(state.items())), "param_groups": groups}


def _indices_to_names(indexed: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of :func:`_names_to_indices` for an optimizer whose parameters are ``names``."""
    groups = [{**group, "params": [names[i] for i in group["params"]]} for group in indexed["param_groups"]]
    return {"state": {names[i]: value for i, value in indexed["state"].items()}, "param_groups": groups}


class FullState:
    """The full (unsharded) model and optimizer state dicts of a sharded model, on CPU,
    held by rank 0 (the other ranks hold None)."""

    def __init__(self, model: dict[str, torch.Tensor] | None, optimizer: dict[str, Any] | None,
                 tied: list[list[str]]):
        self.model = model
        self.optimizer = optimizer
        self.tied = tied

    def save_model(self, path: Path) -> None:
        """``model.safetensors`` exactly as safetensors' ``save_model`` writes it for the
        unsharded model: of each group of tied names only the alphabetically first is
        stored, and the metadata maps each dropped name to it."""
        tensors = dict(self.model)
        metadata: dict[str, str] | None = None
        for names in self.tied:
            present = [n for n in names if n in tensors]
            for name in present[1:]:
                metadata = metadata or {}
                metadata.setdefault(name, present[0])
                del tensors[name]
        save_file(tensors, str(path), metadata=metadata)


def _base(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    # The SAM family and Nexus wrap a base optimizer that holds the groups and the state;
    # their state_dict is {"base": <the base's>, ...}.
    return getattr(optimizer, "base", optimizer)


def _reshard(model: torch.nn.Module) -> None:
    from ..tensors.fsdp import reshard

    reshard(model)


def gather_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> FullState:
    """Full state dicts of an FSDP2 model and its optimizer, collected on rank 0 (CPU).

    Collective: every rank must call it. The optimizer state is in the layout a single
    process writes (parameters numbered by their position in the groups), so the file
    loads into an unsharded optimizer too.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    # After a forward without grad the root holds unsharded parameters: the state dicts
    # must name the sharded ones (the ones the optimizer holds).
    _reshard(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # only rank 0 receives
    lead = dist.get_rank() == 0
    model_state = get_model_state_dict(model, options=options)
    base = _base(optimizer)
    if base.state:
        # Name-keyed, gathered on rank 0, then numbered as a single process numbers them.
        named = get_optimizer_state_dict(model, base, options=options)
        base_state = _names_to_indices(named) if lead else None
    else:
        # Nothing to gather (no step taken yet); get_optimizer_state_dict would take a
        # zero step to create state, which would change the run.
        base_state = base.state_dict() if lead else None
    optimizer_state = base_state
    if lead and base is not optimizer:
        optimizer_state = {**{k: v for k, v in optimizer.state_dict().items() if k != "base"}, "base": base_state}
    return FullState(model_state if lead else None, optimizer_state, _tied_names(model))


def _load_full_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load a checkpoint's full state dicts into an FSDP2 model and its optimizer (every
    rank reads the files and keeps its own shards)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    _reshard(model)
    try:
        tensors = load_file(str(path / MODEL_FILE))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise UserError(f"{path / MODEL_FILE} cannot be loaded into this model ({exc}); check the model settings") from None
    for names in _tied_names(model):  # the file holds one name of each tied group
        present = [n for n in names if n in tensors]
        for name in names:
            if present:
                tensors.setdefault(name, tensors[present[0]])
    expected = set(model.state_dict())
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise UserError(f"{path / MODEL_FILE} does not match the model (missing {sorted(missing)[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}); use the run's own config")
    try:
        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True))
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"{path / MODEL_FILE} cannot be loaded into this model ({exc}); check the model settings") from None
    if optimizer is None:
        return
    base = _base(optimizer)
    try:
        saved = torch.load(path / OPTIMIZER_FILE, weights_only=True)
        base_saved = saved["base"] if base is not optimizer else saved
        names = _parameter_names(model, base)
        sizes = [len(g["params"]) for g in base_saved["param_groups"]]
        if sizes != [len(g["params"]) for g in base.param_groups]:
            raise ValueError(f"parameter groups of sizes {sizes}, this optimizer has "
                             f"{[len(g['params']) for g in base.param_groups]}")
        if base_saved["state"]:
            set_optimizer_state_dict(model, base, _indices_to_names(base_saved, names),
                                     options=StateDictOptions(full_state_dict=True))
        else:
            base.load_state_dict(base_saved)
        if base is not optimizer:
            # The wrapper's own entries; its base keeps the state just loaded.
            optimizer.load_state_dict({**saved, "base": base.state_dict()})
    except (RuntimeError, ValueError, KeyError, IndexError, TypeError, OSError) as exc:
        raise UserError(f"{path / OPTIMIZER_FILE} cannot be loaded ({exc}); check the optimizer settings") from None


def checkpoint_config(checkpoint: Path) -> TrainConfig:
    """The TrainConfig of the run a checkpoint folder (RUN/checkpoints/stepN) belongs to."""
    config_file = checkpoint.parent.parent / "config.json"
    if not config_file.is_file():
        raise UserError(f"no config.json two levels above '{checkpoint}'; give a checkpoints/stepNNNNNNNN folder of a run")
    try:
        return from_dict(TrainConfig, json.loads(config_file.read_text(encoding="utf-8"))["train"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{config_file} is not the config of a training run") from None
