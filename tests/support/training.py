"""Training a run in the test process, the way the trainer tests need it, and reading
what a run wrote (its raw metrics rows, its last checkpoint's weights)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def train_one_thread(out: Path, overrides: list[str], *, resume: bool = False) -> Path:
    """Train (or resume) the run ``out`` from default settings plus ``overrides``, on one
    torch thread for speed. The thread count is put back afterwards: later tests compare an
    in-process run with a subprocess one, which must reduce in the same order."""
    from sharpscope.config import load_config
    from sharpscope.training.config import TrainConfig
    from sharpscope.training.trainer import Trainer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(load_config(TrainConfig, None, overrides), out, resume=resume).run()
    finally:
        torch.set_num_threads(threads)
    return out


def run_rows(run: Path) -> list[dict]:
    """The rows of ``run``'s metrics.jsonl as written, without the run reader's checks
    (callback runs and half-written runs are read too)."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def final_weights(run: Path) -> dict:
    """The model weights of ``run``'s last checkpoint."""
    from safetensors.torch import load_file

    return load_file(str(sorted((run / "checkpoints").glob("step*"))[-1] / "model.safetensors"))
