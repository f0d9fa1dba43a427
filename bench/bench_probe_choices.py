"""Claim: which probe makes critical sharpness trustworthy on stochastic training, and at
what cost. Decides the trainer's default probe (docs/measures.md quotes this table).

Each ladder run of the measured study (configs/study.toml: sizes, budget, lr, schedule,
cadence of 100 measurements per run) is trained once, with one monitor per probe choice
around the same optimizer steps (a measurement leaves training bit-identical, so every
monitor sees the same run):

* fixed-16: one fixed held-out batch of 16 sequences (the old default);
* fixed-64 / fixed-128: 4 / 8 fixed held-out micro-batches of 16 (forward passes only: a
  larger probe costs time, not memory);
* step: the batch the step was computed on; next: the next training batch;
* grow-10%: up to 8 fixed micro-batches, doubling from 1 until stderr/λ_c ≤ 0.1.

Per probe: the share of failed measurements (no bracket), the median stderr/λ_c, the
median step-to-step |log ratio| of λ_c, the final value's seed spread (std/mean over
seeds of 2/⟨η_c⟩ on the last 10% of measurements, not_descent counted as η_c = 0) and
the cost (sequence-forwards per measurement, in units of one training step ≈ 3 forward
passes of its 16 sequences; and wall time per measurement).

    python bench/bench_probe_choices.py [--sizes 1x24,1x48,2x64] [--seeds 0,1,2]
                                        [--device cpu|cuda] [--jobs N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sharpscope.config import load_config
from sharpscope.curvature import SharpnessMonitor
from sharpscope.experiments.grid_study import StudyConfig, plan_study
from sharpscope.training import data as data_lib
from sharpscope.training.trainer import Trainer, lm_loss, lm_sequence_losses, lr_at

ROOT = Path(__file__).resolve().parents[1]
MICRO = 16
VARIANTS = {  # name: (probe, fixed micro-batches, target)
    "fixed-16": ("fixed", 1, 0.0),
    "fixed-64": ("fixed", 4, 0.0),
    "fixed-128": ("fixed", 8, 0.0),
    "step": ("step", 0, 0.0),
    "next": ("next", 0, 0.0),
    "grow-10%": ("fixed", 8, 0.1),
}


def _one_run(job: tuple[str, int, str, dict]) -> dict:
    size, seed, device, config_path = job
    torch.set_num_threads(1)
    cfg = load_config(StudyConfig, config_path)
    [run] = [r for r in plan_study(cfg) if r.size == size and r.seed == seed and r.schedule == cfg.ladder_schedule
             and "scales" == r.config.group]
    tcfg = run.config
    every = tcfg.monitor.every
    import dataclasses
    tcfg = dataclasses.replace(tcfg, device=device, monitor=dataclasses.replace(tcfg.monitor, every=0, exact_every=0))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(tcfg, Path(tmp) / "run")
    model, opt = trainer.model, trainer.optimizer
    val = data_lib.BatchSampler(trainer.sources, batch_size=MICRO, block_size=tcfg.model.block_size,
                                seed=tcfg.seed + 1, split="val")
    micro = [trainer._to_device(val.batch_at(i)) for i in range(8)]
    monitors = {}
    for name, (probe, n, target) in VARIANTS.items():
        monitors[name] = SharpnessMonitor(model, lm_sequence_losses, micro[:n] if probe == "fixed" else None, opt,
                                          every=every, probe=probe, probe_target=target)
    rows = {name: [] for name in VARIANTS}
    seconds = {name: 0.0 for name in VARIANTS}
    for step in range(tcfg.steps):
        lr = lr_at(tcfg, step)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = trainer._to_device(trainer.sampler.next_batch())
        nxt = trainer._to_device(trainer.sampler.batch_at(trainer.sampler.position))
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.optim.grad_clip)
        for name, m in monitors.items():
            probe = VARIANTS[name][0]
            m.begin_step(step, batch=batch if probe == "step" else nxt if probe == "next" else None)
        opt.step()
        for name, m in monitors.items():
            t0 = time.perf_counter()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            metrics = m.end_step()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if metrics:
                seconds[name] += time.perf_counter() - t0
                last = m.last
                rows[name].append({"step": step, "lr": lr, "status": last.status, "lambda": last.sharpness,
                                   "eta": last.eta, "se": last.stderr, "evals": last.evals,
                                   "batches": metrics.get("sharpness/probe_batches", float(VARIANTS[name][1] or 1)),
                                   "descent_step": metrics.get("sharpness/descent_step", math.nan),
                                   "descent_probe": metrics.get("sharpness/descent_probe", math.nan)})
    return {"size": size, "seed": seed, "n_params": run.n_params, "steps": tcfg.steps, "rows": rows,
            "seconds": seconds, "batch_size": tcfg.data.batch_size}


def _run_stats(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    lam = np.array([r["lambda"] for r in ok])
    se_rel = np.array([r["se"] / r["lambda"] for r in ok if math.isfinite(r["se"])])
    logs = np.abs(np.diff(np.log(lam))) if lam.size > 1 else np.array([])
    tail = rows[-max(1, len(rows) // 10):]
    etas = np.array([0.0 if r["status"] == "not_descent" else r["eta"] for r in tail
                     if r["status"] in ("ok", "not_descent")])
    not_descent = [r for r in rows if r["status"] == "not_descent"]
    return {
        "failed": 1.0 - len(ok) / max(1, len(rows)),
        "not_descent": len(not_descent) / max(1, len(rows)),
        "noisy_probe": sum(r["descent_step"] > 0 for r in not_descent) / max(1, len(not_descent)) if not_descent else math.nan,
        "se_rel": float(np.median(se_rel)) if se_rel.size else math.nan,
        "log_ratio": float(np.median(logs)) if logs.size else math.nan,
        "final": 2.0 / etas.mean() if etas.size and etas.mean() > 0 else math.inf,
        "final_lambda_mean": float(np.mean([r["lambda"] for r in tail if r["status"] == "ok"] or [math.nan])),
        "seq_forwards": float(np.mean([r["evals"] * r["batches"] * MICRO for r in rows])),
    }


def summarise(results: list[dict]) -> dict:
    table = {}
    for name in VARIANTS:
        per_run = [(_run_stats(r["rows"][name]), r) for r in results]
        by_size: dict[str, list[float]] = {}
        finals_lambda: dict[str, list[float]] = {}
        for stats, r in per_run:
            by_size.setdefault(r["size"], []).append(stats["final"])
            finals_lambda.setdefault(r["size"], []).append(stats["final_lambda_mean"])

        def spread(groups):
            values = [np.std(v, ddof=1) / np.mean(v) for v in groups.values() if len(v) > 1 and np.all(np.isfinite(v))]
            return (float(np.mean(values)), float(np.max(values))) if values else (math.nan, math.nan)

        step_cost = 3.0 * results[0]["batch_size"]
        table[name] = {
            "failed_mean": float(np.mean([s["failed"] for s, _ in per_run])),
            "failed_max": float(np.max([s["failed"] for s, _ in per_run])),
            "noisy_probe": float(np.nanmean([s["noisy_probe"] for s, _ in per_run])) if any(
                math.isfinite(s["noisy_probe"]) for s, _ in per_run) else math.nan,
            "se_rel": float(np.nanmedian([s["se_rel"] for s, _ in per_run])),
            "log_ratio": float(np.nanmedian([s["log_ratio"] for s, _ in per_run])),
            "seed_spread_mean": spread(by_size)[0], "seed_spread_max": spread(by_size)[1],
            "seed_spread_lambda_mean": spread(finals_lambda)[0],
            "cost_steps": float(np.mean([s["seq_forwards"] for s, _ in per_run])) / step_cost,
            "ms_per_measurement": 1e3 * float(np.mean([r["seconds"][name] / max(1, len(r["rows"][name]))
                                                       for r in results])),
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "study.toml"))
    parser.add_argument("--sizes", default="1x24,1x48")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--json", default=None, help="write the per-run rows and the table here")
    args = parser.parse_args()
    jobs = [(size, int(seed), args.device, args.config) for size in args.sizes.split(",")
            for seed in args.seeds.split(",")]
    t0 = time.perf_counter()
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results = pool.map(_one_run, jobs)
    else:
        results = [_one_run(j) for j in jobs]
    table = summarise(results)
    print(f"{len(results)} runs (sizes {args.sizes}, seeds {args.seeds}, {args.device}) in "
          f"{time.perf_counter() - t0:.0f} s; 100 measurements per run")
    print("| probe | failed (mean / worst run) | not_descent with descent on the step batch | median stderr/λ_c "
          "| median step-to-step |log ratio| | final-value seed spread, η-space (mean / worst size) "
          "| same, mean of λ_c | cost per measurement (training steps) | ms per measurement |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = table["fixed-16"]
    for name, t in table.items():
        print(f"| {name} | {100 * t['failed_mean']:.1f}% / {100 * t['failed_max']:.1f}% | "
              f"{100 * t['noisy_probe']:.0f}% | {t['se_rel']:.3f} | {t['log_ratio']:.3f} | "
              f"{100 * t['seed_spread_mean']:.1f}% / {100 * t['seed_spread_max']:.1f}% | "
              f"{100 * t['seed_spread_lambda_mean']:.1f}% | {t['cost_steps']:.2f} "
              f"({t['cost_steps'] / base['cost_steps']:.1f}x fixed-16) | {t['ms_per_measurement']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"table": table, "runs": results}, default=float))


if __name__ == "__main__":
    main()
