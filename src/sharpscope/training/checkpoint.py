"""Checkpoints: ``checkpoints/step{N:08d}/`` holding ``model.safetensors``,
``optimizer.pt`` and ``train_state.json``.

* Written into a hidden temporary folder and renamed into place, so a checkpoint either
  exists whole or not at all; older ones are pruned only after the new one is in place.
* ``train_state.json`` records the step, tokens seen, the data sampler's position, the
  RNG states, the monitor's warm start, and the SHA-256 of the two weight files, so a
  truncated or corrupted file is detected before anything is loaded.
* Nothing is unpickled beyond ``torch.load(weights_only=True)``.
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
from safetensors.torch import load_model, save_model

from ..errors import UserError
from ..runs import atomic_write_text

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
                    state: dict[str, Any], keep: int) -> Path:
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / MODEL_FILE))
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
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


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load weights (and optimizer state) in place; returns the train state."""
    path = Path(path)
    state = read_state(path)
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
