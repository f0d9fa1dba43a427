"""Shared set-up for the curvature benchmarks: a small byte-level GPT trained with AdamW
on a local corpus (the Python standard library's own source files, present on every
machine with Python), so the measurements are taken on a real training trajectory."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch

from sharpscope.schedules import lr_multiplier
from sharpscope.training.model import GPT, GPTConfig, count_parameters
from sharpscope.training.trainer import lm_loss as loss_fn  # next-token cross-entropy

BLOCK = 64
BATCH = 16


def stdlib_corpus(max_bytes: int = 2_000_000) -> torch.Tensor:
    root = Path(sysconfig.get_paths()["stdlib"])
    data = bytearray()
    for path in sorted(root.glob("*.py")):
        data += path.read_bytes()
        if len(data) >= max_bytes:
            break
    return torch.tensor(list(data[:max_bytes]), dtype=torch.long)


def batch_at(tokens: torch.Tensor, gen: torch.Generator, batch: int = BATCH):
    starts = torch.randint(0, tokens.numel() - BLOCK - 1, (batch,), generator=gen)
    x = torch.stack([tokens[s : s + BLOCK] for s in starts])
    y = torch.stack([tokens[s + 1 : s + BLOCK + 1] for s in starts])
    return x, y


def small_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=256, block_size=BLOCK, n_layer=2, n_head=4, d_model=64))


def describe(model) -> str:
    return f"GPT 2 layers, width 64, {count_parameters(model):,} parameters, batch {BATCH}x{BLOCK} bytes"


def train(model, tokens, steps: int, *, lr: float = 3e-3, seed: int = 0, on_step=None):
    """AdamW with warmup + cosine; ``on_step(step, optimizer, do_step)`` wraps each step."""
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * lr_multiplier("cosine", step, steps, warmup_steps=steps // 10, min_ratio=0.1)
        batch = batch_at(tokens, gen)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        if on_step is None:
            opt.step()
        else:
            on_step(step, opt, opt.step)
    return opt
