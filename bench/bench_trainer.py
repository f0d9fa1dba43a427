"""Claims: the trainer's throughput is within 5% of a bare training loop of the same model
in the same run, and the sharpness monitor at its default cadence costs at most 2% of
training time. Also prints tokens/s and peak memory for each model preset that fits here.

Bare loop: the same model, sampler batches, AdamW, clipping and lr schedule, nothing else.
Trainer: `sharpscope.training.trainer.Trainer` with evaluation and checkpoints pushed past
the end (so only the per-step work is compared), first with the monitor off, then at the
default cadence. Each is timed over the same steps after a warm-up, alternating runs so
drift on the machine hits all three alike; the median of the repeats is reported.
"""

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sharpscope.config import load_config
from sharpscope.training import data as data_lib
from sharpscope.training.config import MonitorConfig, TrainConfig
from sharpscope.training.model import PRESETS
from sharpscope.training.trainer import Trainer, build_model, build_optimizer, lm_loss, lr_at

STEPS, REPEATS = 1000, 3
COMMON = ["progress=false", "model.preset=tiny", "model.block_size=64", "data.sources=code",
          "data.max_bytes=1000000", "eval.every=0", "checkpoint.every=0", "steps=%d" % STEPS]


def config(*extra):
    return load_config(TrainConfig, None, COMMON + list(extra))


def bare_loop(cfg: TrainConfig) -> float:
    torch.manual_seed(cfg.seed)
    sources = data_lib.load_sources(cfg.data.sources, max_bytes=cfg.data.max_bytes)
    sampler = data_lib.BatchSampler(sources, batch_size=cfg.data.batch_size, block_size=cfg.model.block_size)
    model = build_model(cfg.model, 256)
    opt = build_optimizer(cfg.optim, model)
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, sampler.next_batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
    return time.perf_counter() - t0


MONITOR_SECONDS = []


def trainer_loop(cfg: TrainConfig) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run")
        trainer.evaluate = lambda: {}  # the step-0 and final evaluations are not per-step work
        if trainer.monitor is not None:
            measure = trainer.monitor.measure

            def timed_measure(capture):
                t = time.perf_counter()
                out = measure(capture)
                MONITOR_SECONDS.append(time.perf_counter() - t)
                return out

            trainer.monitor.measure = timed_measure
        t0 = time.perf_counter()
        trainer.run()
        return time.perf_counter() - t0


def preset_worker(preset: str) -> None:
    cfg = load_config(TrainConfig, None, ["model.preset=" + preset, "model.block_size=128", "data.batch_size=8"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 256)
    opt = build_optimizer(cfg.optim, model)
    x = torch.randint(0, 256, (8, 128))
    steps = 3 if preset in ("medium", "large") else 10
    for i in range(steps + 1):
        if i == 1:
            t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        lm_loss(model, (x, x)).backward()
        opt.step()
    elapsed = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"n_params": n, "tokens_per_s": steps * 8 * 128 / elapsed,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--preset":
        preset_worker(sys.argv[2])
        return
    every = MonitorConfig().every
    plain, monitored = config("monitor.every=0"), config()
    tokens = STEPS * plain.data.batch_size * plain.model.block_size
    times = {"bare": [], "trainer": [], "monitored": []}
    bare_loop(config("steps=20"))  # warm-up: corpus cache, allocator, threads
    for _ in range(REPEATS):
        times["bare"].append(bare_loop(plain))
        times["trainer"].append(trainer_loop(plain))
        times["monitored"].append(trainer_loop(monitored))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"tiny GPT, batch {plain.data.batch_size}x{plain.model.block_size}, {STEPS} steps, median of {REPEATS}")
    for name, t in med.items():
        print(f"{name:10s} {t:6.2f} s   {tokens / t:9.0f} tokens/s")
    print(f"trainer / bare loop = {med['trainer'] / med['bare']:.3f} (claim ≤ 1.05)")
    n_measured = len(range(0, STEPS, every))
    inside = sum(MONITOR_SECONDS) / REPEATS
    step_time = med["trainer"] / STEPS
    print(f"monitor every {every} steps ({n_measured} measurements per run): time inside the monitor "
          f"{inside:.3f} s = {inside / med['trainer'] * 100:.2f}% of training time (claim ≤ 2%); "
          f"one measurement ≈ {inside / n_measured / step_time:.1f} training steps")
    print(f"end to end (noisier): monitored / plain trainer = {med['monitored'] / med['trainer']:.3f}")
    print("presets (batch 8x128, AdamW step, CPU):")
    for preset in PRESETS:
        proc = subprocess.run([sys.executable, __file__, "--preset", preset], capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"  {preset:7s} did not run: {proc.stderr.strip().splitlines()[-1]}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  {preset:7s} {r['n_params']:>12,d} params  {r['tokens_per_s']:9.0f} tokens/s  peak RSS {r['peak_rss_mb']:6.0f} MB")


if __name__ == "__main__":
    main()
