"""Claim: the standard error that critical sharpness reports (a bootstrap over the probe's
examples, no extra forward pass) matches the real spread of λ_c over independent probes
of the same size, within a factor of 2, on a transformer LM.

A byte-level GPT (configs/tiny.toml's model) is trained a few hundred AdamW steps on the
built-in sources; at its final θ, along the AdamW update of one training batch, λ_c is
measured on many independent held-out probe batches of n sequences (per-sequence losses).
The real spread is half the central 68% of those λ_c (the standard deviation for a normal
distribution, robust to the heavy tail of a reciprocal); the reported one is the median
of the per-measurement stderr. Also for the step's own batch, resampled from a pool of
training windows.

    python bench/bench_critical_stderr.py [--steps 300] [--probes 80] [--sizes 16,64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sharpscope.config import load_config
from sharpscope.curvature import critical_sharpness, update_direction
from sharpscope.curvature.bootstrap import half_width_68
from sharpscope.training import data as data_lib
from sharpscope.training.config import TrainConfig
from sharpscope.training.trainer import Trainer, lm_loss, lm_sequence_losses

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--probes", type=int, default=80)
    parser.add_argument("--sizes", default="16,64")
    a = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(TrainConfig, ROOT / "configs" / "tiny.toml",
                      [f"steps={a.steps}", "progress=false", "monitor.every=0", "eval.every=0",
                       "eval.arithmetic_problems=0"])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trainer = Trainer(cfg, Path(tmp) / "run")
        trainer.run()
        print(f"tiny GPT ({sum(p.numel() for p in trainer.model.parameters()):,} parameters) trained "
              f"{a.steps} AdamW steps in {time.perf_counter() - t0:.0f} s")
        model, opt = trainer.model, trainer.optimizer
        batch = trainer.sampler.batch_at(trainer.sampler.position)
        direction = update_direction(model, lm_loss, batch, opt)
        block = cfg.model.block_size
        print("| probe | n sequences | measurements (failed) | median λ_c | real spread | median reported stderr "
              "| reported / real |")
        print("|---|---|---|---|---|---|---|")
        for split in ("val", "train"):
            for n in (int(s) for s in a.sizes.split(",")):
                sampler = data_lib.BatchSampler(trainer.sources, batch_size=n, block_size=block,
                                                seed=cfg.seed + 7, split=split)
                values, errors, failed = [], [], 0
                for k in range(a.probes):
                    # far from the training positions so a train-split probe is not the step's batch
                    r = critical_sharpness(model, lm_sequence_losses, sampler.batch_at(10_000 + k), direction)
                    if r.ok:
                        values.append(r.sharpness)
                        errors.append(r.stderr)
                    else:
                        failed += 1
                values = np.array(values)
                spread, reported = half_width_68(values), float(np.median(errors))
                name = "held-out" if split == "val" else "training windows"
                print(f"| {name} | {n} | {len(values)} ({failed}) | {np.median(values):.1f} | {spread:.1f} | "
                      f"{reported:.1f} | {reported / spread:.2f} |")


if __name__ == "__main__":
    main()
