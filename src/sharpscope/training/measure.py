"""Curvature of a saved checkpoint: λ_c along the optimizer's next update, λ_max, the
trace, and (AdamW) preconditioned sharpness, on batches from a data source."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..config import from_dict
from ..errors import UserError
from ..curvature import (critical_sharpness, hessian_eigenvalues, hessian_trace, preconditioned_sharpness,
                         update_direction)
from . import data as data_lib
from .checkpoint import load_checkpoint, read_state
from .config import TrainConfig
from .trainer import TOKENIZER_FILE, build_model, build_optimizer, lm_loss, lr_at, make_run_tokenizer, plain_optimizer


def checkpoint_config(checkpoint: Path) -> TrainConfig:
    """The TrainConfig of the run a checkpoint folder (RUN/checkpoints/stepN) belongs to."""
    config_file = checkpoint.parent.parent / "config.json"
    if not config_file.is_file():
        raise UserError(f"no config.json two levels above '{checkpoint}'; give a checkpoints/stepNNNNNNNN folder of a run")
    try:
        return from_dict(TrainConfig, json.loads(config_file.read_text(encoding="utf-8"))["train"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{config_file} is not the config of a training run") from None


def measure_checkpoint(checkpoint: Path, data: str, *, batch_size: int = 16, n_batches: int = 1,
                       lanczos_iters: int = 30, trace_samples: int = 32, seed: int = 0) -> dict[str, Any]:
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise UserError(f"checkpoint folder '{checkpoint}' not found")
    if batch_size < 1 or n_batches < 1:
        raise UserError("--batch-size and --batches must be at least 1")
    read_state(checkpoint)  # checksums first: a corrupt checkpoint is named before anything loads
    config = checkpoint_config(checkpoint)
    run_dir = checkpoint.parent.parent
    if config.data.tokenizer != "bytes" and not (run_dir / TOKENIZER_FILE).is_file():
        raise UserError(f"{run_dir / TOKENIZER_FILE} is missing; the run's tokenizer is needed to measure it")
    tokenizer = make_run_tokenizer(config, run_dir, save=False)
    source = data_lib.load_source(data, tokenizer=tokenizer, max_bytes=config.data.max_bytes, seed=seed)
    sampler = data_lib.BatchSampler({source.name: source}, batch_size=batch_size,
                                    block_size=config.model.block_size, seed=seed, split="val")
    batches = [sampler.batch_at(k) for k in range(n_batches)]
    model = build_model(config.model, tokenizer.vocab_size)
    optimizer = build_optimizer(config.optim, model)
    state = load_checkpoint(checkpoint, model, optimizer)
    step = int(state["step"])
    lr = lr_at(config, min(step, config.steps - 1))
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.eval()
    # The SAM family and Nexus: the direction their base optimizer takes from the plain gradient.
    direction = update_direction(model, lm_loss, batches, plain_optimizer(optimizer))
    crit = critical_sharpness(model, lm_loss, batches, direction, eta0=lr)
    eig = hessian_eigenvalues(model, lm_loss, batches, k=1, max_iter=lanczos_iters, tol=1e-4)
    trace = hessian_trace(model, lm_loss, batches, samples=trace_samples)
    out: dict[str, Any] = {
        "checkpoint": str(checkpoint), "step": step, "data": source.name, "loss": crit.loss0, "lr": lr,
        "sharpness/critical": crit.sharpness, "sharpness/eta_c": crit.eta, "critical_status": crit.status,
        "sharpness/evals": crit.evals, "sharpness/lr_over_eta_c": lr / crit.eta if crit.eta > 0 else math.nan,
        "sharpness/lambda_max": eig.values[0], "sharpness/trace": trace.estimate,
        "sharpness/trace_stderr": trace.stderr, "sharpness/trace_per_param": trace.per_param,
        "sharpness/two_over_lr": 2.0 / lr,
    }
    if isinstance(plain_optimizer(optimizer), torch.optim.AdamW) and optimizer.state:
        pre = preconditioned_sharpness(model, lm_loss, batches, optimizer, max_iter=lanczos_iters, tol=1e-4)
        out["sharpness/preconditioned"] = pre.value
        out["sharpness/preconditioned_threshold"] = pre.threshold
    return out
