"""Claim: the measured study's throughput (runs per hour at each ladder size) and the share
of it that the sharpness measurements take (the live monitor and the coarser λ_max /
trace / preconditioned-sharpness measurements).

For each size of the study config (configs/study.toml by default), three truncated copies
of its seed-0 ladder run are trained with the study's own cadences (same steps between
measurements, so the monitor's warm start helps exactly as much as in the study):
  off      monitor and exact measures off,
  monitor  critical sharpness at the study's cadence,
  exact    the same plus one exact measurement at the end.
Per-measurement costs come from the differences; a full run's time is then
steps × step time + (monitor points) × monitor cost + (exact points) × exact cost, plus
the start-up and evaluation time measured in the same runs. The three variants alternate
over repeats and the median is used. Threads: whatever torch uses here (2 cores).

    python bench/bench_study.py [--config configs/study.toml] [--repeats 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

from sharpscope.config import load_config
from sharpscope.training.study import StudyConfig, plan_study
from sharpscope.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def timed(cfg, workdir: Path) -> float:
    out = Path(tempfile.mkdtemp(dir=workdir))
    t0 = time.perf_counter()
    train(cfg, out)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "study.toml"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--measurements", type=int, default=4, help="monitor measurements per truncated run")
    args = p.parse_args()
    study = load_config(StudyConfig, args.config, [])
    runs = [r for r in plan_study(study) if r.seed == study.seeds[0] and r.schedule == study.ladder_schedule]
    print(f"study config {args.config}: {len(plan_study(study))} runs; timing the seed-{study.seeds[0]} ladder")
    print(f"{'size':>7} {'params':>9} {'steps':>7} {'step ms':>8} {'monitor ms':>10} {'exact s':>8} "
          f"{'run min':>8} {'runs/h':>7} {'measure share':>13}")
    total_hours = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        for r in runs:
            cfg = r.config
            every = cfg.monitor.every
            steps_b = min(cfg.steps, every * args.measurements)
            n_meas = steps_b // every
            base = dataclasses.replace(cfg, steps=steps_b, checkpoint=dataclasses.replace(cfg.checkpoint, every=0),
                                       eval=dataclasses.replace(cfg.eval, every=0))
            variants = {
                "off": dataclasses.replace(base, monitor=dataclasses.replace(cfg.monitor, every=0, exact_every=0)),
                "monitor": dataclasses.replace(base, monitor=dataclasses.replace(cfg.monitor, exact_every=0)),
                "exact": dataclasses.replace(base, monitor=dataclasses.replace(cfg.monitor, exact_every=steps_b)),
            }
            times = {k: [] for k in variants}
            for _ in range(args.repeats):
                for k, v in variants.items():
                    times[k].append(timed(v, workdir))
            off, mon, exact = (statistics.median(times[k]) for k in ("off", "monitor", "exact"))
            # start-up + two evaluations (start, end) are the time of a 1-step run without the monitor
            fixed = statistics.median(timed(dataclasses.replace(variants["off"], steps=1), workdir)
                                      for _ in range(args.repeats))
            step_s = max(off - fixed, 1e-9) / max(steps_b - 1, 1)
            monitor_s = max(mon - off, 0.0) / max(n_meas, 1)
            exact_s = max(exact - mon, 0.0)
            n_monitor = cfg.steps // every
            n_exact = cfg.steps // cfg.monitor.exact_every if cfg.monitor.exact_every else 0
            n_eval = cfg.steps // cfg.eval.every if cfg.eval.every else 0
            eval_s = fixed / 2  # about half the fixed cost is one evaluation pass (start or end)
            measure = n_monitor * monitor_s + n_exact * exact_s
            run_s = fixed + cfg.steps * step_s + measure + n_eval * eval_s
            total_hours += run_s / 3600 * sum(1 for x in plan_study(study) if x.size == r.size)
            print(f"{r.size:>7} {r.n_params:>9,d} {cfg.steps:>7,d} {1000 * step_s:>8.2f} {1000 * monitor_s:>10.1f} "
                  f"{exact_s:>8.2f} {run_s / 60:>8.2f} {3600 / run_s:>7.1f} {measure / run_s:>13.1%}")
    print(f"estimated wall time of the whole grid here: {total_hours * 60:.0f} min "
          f"(ladder sizes weighted by their run counts, schedules at the same sizes cost alike)")


if __name__ == "__main__":
    main()
