"""Claim: the measured study's throughput (runs per hour at each ladder size) and the share
of it that the sharpness measurements take (the live monitor and the coarser λ_max /
trace / preconditioned-sharpness measurements).

For each size of the study config (configs/study.toml by default) a truncated copy of its
seed-0 ladder run is trained with the study's own cadences (same steps between
measurements, so the monitor's warm start helps as much as in the study), with two exact
measurements. Time is taken inside the trainer's parts: start-up (data, model), the
monitor's measurements, the exact measurements, the evaluations, and the rest (training
steps). A full run's time is then extrapolated from the per-step, per-measurement and
per-evaluation costs and the run's real counts. Threads: whatever torch uses here.

    python bench/bench_study.py [--config configs/study.toml]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from sharpscope.config import load_config
from sharpscope.experiments.grid_study import StudyConfig, plan_study
from sharpscope.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]


class PartTimer:
    """Wall time inside selected methods (wrapped for the bench's own runs only)."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.calls = defaultdict(int)

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1

        setattr(owner, name, timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "study.toml"))
    p.add_argument("--min-steps", type=int, default=200, help="fewest steps of a truncated run")
    args = p.parse_args()
    from sharpscope.curvature.monitor import SharpnessMonitor
    from sharpscope.training.trainer import Trainer

    timer = PartTimer()
    timer.wrap(SharpnessMonitor, "measure", "monitor")
    timer.wrap(Trainer, "exact_curvature", "exact")
    timer.wrap(Trainer, "evaluate", "eval")
    timer.wrap(Trainer, "__init__", "startup")
    study = load_config(StudyConfig, args.config, [])
    plan = plan_study(study)
    runs = [r for r in plan if r.seed == study.seeds[0] and r.schedule == study.ladder_schedule]
    print(f"study config {args.config}: {len(plan)} runs; timing the seed-{study.seeds[0]} ladder")
    print(f"{'size':>7} {'params':>9} {'steps':>7} {'step ms':>8} {'monitor ms':>10} {'exact s':>8} "
          f"{'eval s':>7} {'run min':>8} {'runs/h':>7} {'measure share':>13}")
    total_s = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for r in runs:
            cfg = r.config
            steps_b = min(cfg.steps, max(args.min_steps, 4 * cfg.monitor.every))
            run_cfg = dataclasses.replace(
                cfg, steps=steps_b, checkpoint=dataclasses.replace(cfg.checkpoint, every=0),
                monitor=dataclasses.replace(cfg.monitor, exact_every=max(1, steps_b // 2)))
            timer.seconds.clear()
            timer.calls.clear()
            t0 = time.perf_counter()
            train(run_cfg, Path(tmp) / r.name)
            wall = time.perf_counter() - t0
            parts = dict(timer.seconds)
            calls = dict(timer.calls)
            monitor_s = parts.get("monitor", 0.0) / max(calls.get("monitor", 1), 1)
            exact_s = parts.get("exact", 0.0) / max(calls.get("exact", 1), 1)
            eval_s = parts.get("eval", 0.0) / max(calls.get("eval", 1), 1)
            rest = wall - sum(parts.values())  # the training steps and their bookkeeping
            step_s = rest / steps_b
            n_monitor = cfg.steps // cfg.monitor.every if cfg.monitor.every else 0
            n_exact = cfg.steps // cfg.monitor.exact_every if cfg.monitor.exact_every else 0
            n_eval = 1 + (cfg.steps // cfg.eval.every if cfg.eval.every else 1)
            measure = n_monitor * monitor_s + n_exact * exact_s
            run_s = parts.get("startup", 0.0) + cfg.steps * step_s + measure + n_eval * eval_s
            total_s += run_s * sum(1 for x in plan if x.size == r.size)
            print(f"{r.size:>7} {r.n_params:>9,d} {cfg.steps:>7,d} {1000 * step_s:>8.2f} {1000 * monitor_s:>10.1f} "
                  f"{exact_s:>8.2f} {eval_s:>7.2f} {run_s / 60:>8.2f} {3600 / run_s:>7.1f} {measure / run_s:>13.1%}")
    print(f"estimated wall time of the whole grid here: {total_s / 60:.0f} min "
          f"(each size's run time times its number of runs; schedules cost alike)")


if __name__ == "__main__":
    main()
