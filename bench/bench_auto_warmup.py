"""Claim under test: a curvature-aware warmup (``schedule.warmup = "auto"``: the lr rises
by at most ``warmup_growth`` per step and stays under ``warmup_target`` · η̄, η̄ a moving
average of the measured critical lr) trains as well as the best fixed warmup length,
without a warmup length to choose, and avoids the spikes of too short a warmup.

Runs: the built-in ladder through our trainer. ``tiny`` is configs/tiny.toml (200 steps,
cosine); a study shape such as ``1x48`` is the cosine run of configs/study.toml at that
size (its steps, monitor and evaluation cadence, lr 3e-3 AdamW with clipping 1.0). Each
is trained at every lr of ``--lrs`` with the automatic warmup (its defaults) and with
fixed linear warmups of ``--fixed`` fractions of the run (0 = none), for every seed.
The study's monitor settings are kept: the automatic warmup measures every step while
it lasts, then at the run's cadence; the fixed runs are trained without the monitor
(it never changes training, and it would only cost time here).

Reported per (size, lr, warmup), over seeds:

* final validation loss (mean, and the range over seeds);
* steps to reach the threshold: the first evaluation (every 5% of the run) whose
  validation loss is at most ``--within`` above the best final validation loss of that
  size (all lrs and warmups); "-" when a run never gets there (the mean is over the
  runs that did, with how many in brackets when not all);
* spiked: runs with a training-loss spike (a loss above the running median of the
  previous 20 by 5 scaled MADs and 5%, bench_guard's definition); diverged: runs with a
  non-finite loss (``on_nonfinite=skip`` keeps them going) or a final validation loss
  above the first evaluation's;
* for the automatic warmup: its length W (the step where the lr reached the schedule)
  and the measurements it took.

    python bench/bench_auto_warmup.py --quick --jobs 2     # about 8 minutes on 2 busy CPU cores
    python bench/bench_auto_warmup.py --device cuda --jobs 8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_guard import spike_events  # noqa: E402  (the spike definition shared with the guard's bench)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny and 1x48, lrs 3e-3 and 1e-2, seeds 0 and 1")
    p.add_argument("--sizes", default="tiny,1x48,2x64", help="tiny or shapes of configs/study.toml")
    p.add_argument("--lrs", default="3e-3,1e-2,3e-2")
    p.add_argument("--fixed", default="0,0.01,0.05,0.1", help="fixed warmup lengths as fractions of the run")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--within", type=float, default=0.05, help="threshold: nats above the size's best final loss")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    p.add_argument("--json", type=Path, help="also write every run's summary here")
    p.add_argument("auto", nargs="*", help="overrides for the automatic warmup, e.g. schedule.warmup_target=0.3")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.lrs, args.seeds = "tiny,1x48", "3e-3,1e-2", "0,1"
    return args


# ---- configs ------------------------------------------------------------------------------

def base_config(size: str):
    """The TrainConfig of a size: configs/tiny.toml, or the study's cosine run at that shape."""
    from sharpscope.config import load_config
    from sharpscope.training.config import TrainConfig

    if size == "tiny":
        return load_config(TrainConfig, ROOT / "configs" / "tiny.toml")
    from sharpscope.experiments.grid_study import StudyConfig, plan_study

    study = load_config(StudyConfig, ROOT / "configs" / "study.toml")
    if size not in study.sizes:  # a shape of the ladder's settings outside its sizes
        study = dataclasses.replace(study, sizes=[*study.sizes, size])
    return next(r.config for r in plan_study(study) if r.size == size and r.schedule == study.ladder_schedule)


def job_config(size: str, lr: float, warmup: str, seed: int, device: str, auto: list[str]):
    from sharpscope.config import from_dict, parse_overrides, to_dict
    from sharpscope.training.config import TrainConfig

    def merge(base: dict, top: dict) -> dict:
        out = dict(base)
        for key, value in top.items():
            out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        return out

    cfg = base_config(size)
    steps = cfg.steps
    data = to_dict(cfg)
    over = {"name": f"{size}-lr{lr:g}-{warmup}-s{seed}", "seed": seed, "device": device, "progress": False,
            "on_nonfinite": "skip",
            "optim": {"lr": lr},
            "eval": {"every": max(1, steps // 20)},
            "checkpoint": {"every": 0, "keep": 1},
            "monitor": {"exact_every": 0}}
    if warmup == "auto":
        over["schedule"] = {"warmup": "auto"}
    else:
        over["schedule"] = {"warmup": "fixed", "warmup_steps": int(round(float(warmup) * steps))}
        over["monitor"]["every"] = 0
    data = merge(merge(data, over), parse_overrides(auto) if warmup == "auto" else {})
    return from_dict(TrainConfig, data)


# ---- one run ------------------------------------------------------------------------------

def train_one(job: dict) -> dict:
    """Train one setting; returns its loss series and summaries. Runs in a worker process."""
    import torch

    torch.set_num_threads(job["threads"])
    from sharpscope.training.trainer import Trainer

    config = job_config(job["size"], job["lr"], job["warmup"], job["seed"], job["device"], job["auto"])
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(config, Path(tmp) / "run").run()
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = config.steps
    loss = [math.nan] * (steps + 1)
    evals: list[tuple[int, float]] = []
    warmup_steps = None
    measured = 0
    ratios = []
    for r in rows:
        s = r["step"]
        if r.get("train/skipped"):
            loss[s] = math.inf
        elif r.get("train/loss") is not None:
            loss[s] = r["train/loss"]
        if r.get("eval/loss") is not None:
            evals.append((s, r["eval/loss"]))
        if "schedule/warmup_steps" in r:
            warmup_steps = r["schedule/warmup_steps"]
        if "schedule/warmup_lr" in r and "sharpness/eta_c" in r:
            measured += 1
            eta = r["sharpness/eta_c"]
            ratios.append(r["lr"] / eta if eta else math.inf)
    return {**job, "steps": steps, "loss": loss, "evals": evals, "warmup_steps": warmup_steps,
            "measured": measured, "max_ratio": max(ratios) if ratios else math.nan,
            "seconds": time.perf_counter() - t0}


def run_all(jobs: list[dict], n: int) -> list[dict]:
    if n <= 1:
        return [train_one(j) for j in jobs]
    import multiprocessing

    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(train_one, jobs))


# ---- the table ----------------------------------------------------------------------------

def summarise(results: list[dict], within: float) -> list[dict]:
    best = {}
    for r in results:
        final = r["evals"][-1][1]
        if math.isfinite(final):
            best[r["size"]] = min(best.get(r["size"], math.inf), final)
    cells: dict[tuple, list[dict]] = {}
    for r in results:
        cells.setdefault((r["size"], r["lr"], r["warmup"]), []).append(r)
    out = []
    for (size, lr, warmup), runs in cells.items():
        threshold = best[size] + within
        finals = [r["evals"][-1][1] for r in runs]
        reached = [next((s for s, v in r["evals"] if v <= threshold), None) for r in runs]
        hit = [s for s in reached if s is not None]
        spiked = sum(1 for r in runs if spike_events(r["loss"], 20, 5.0))
        diverged = sum(1 for r in runs if any(x == math.inf for x in r["loss"])
                       or not r["evals"][-1][1] <= r["evals"][0][1])
        ws = [r["warmup_steps"] for r in runs if r["warmup_steps"] is not None]
        out.append({"size": size, "lr": lr, "warmup": warmup, "steps": runs[0]["steps"], "threshold": threshold,
                    "final": statistics.fmean(finals), "final_lo": min(finals), "final_hi": max(finals),
                    "reach": statistics.fmean(hit) if hit else None, "reached": len(hit), "runs": len(runs),
                    "spiked": spiked, "diverged": diverged,
                    "W": ws, "unfinished": sum(1 for r in runs if r["warmup"] == "auto" and r["warmup_steps"] is None),
                    "measured": statistics.fmean(r["measured"] for r in runs) if warmup == "auto" else None,
                    "max_ratio": max(r["max_ratio"] for r in runs) if warmup == "auto" else None})
    return out


def warmup_label(warmup: str, steps: int) -> str:
    if warmup == "auto":
        return "auto"
    n = int(round(float(warmup) * steps))
    return f"fixed {float(warmup):.0%} ({n})"


def print_table(rows: list[dict]) -> None:
    print("| size (steps) | lr | warmup | final val loss, mean (range) | steps to threshold | spiked | diverged "
          "| auto: W (range), measured, max lr/η_c |")
    print("|---|---|---|---|---|---|---|---|")
    for c in rows:
        reach = "-" if c["reach"] is None else f"{c['reach']:.0f}"
        if c["reach"] is not None and c["reached"] < c["runs"]:
            reach += f" ({c['reached']}/{c['runs']})"
        auto = ""
        if c["warmup"] == "auto":
            w = c["W"]
            span = f"{statistics.fmean(w):.0f} ({min(w)}-{max(w)})" if w else "-"
            if c["unfinished"]:
                span += f", {c['unfinished']} never ended"
            auto = f"{span}, {c['measured']:.0f}, {c['max_ratio']:.2f}"
        print(f"| {c['size']} ({c['steps']}) | {c['lr']:g} | {warmup_label(c['warmup'], c['steps'])} | "
              f"{c['final']:.3f} ({c['final_lo']:.3f}-{c['final_hi']:.3f}) | {reach} | {c['spiked']}/{c['runs']} | "
              f"{c['diverged']}/{c['runs']} | {auto} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    sizes = args.sizes.split(",")
    lrs = [float(x) for x in args.lrs.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    warmups = ["auto", *args.fixed.split(",")]
    threads = 1 if args.device == "cpu" else 2
    jobs = [dict(size=size, lr=lr, warmup=w, seed=seed, device=args.device, auto=list(args.auto), threads=threads)
            for size in sizes for lr in lrs for w in warmups for seed in seeds]
    # The longest runs first, so the pool is not left waiting on one at the end.
    jobs.sort(key=lambda j: -(sizes.index(j["size"]) * 10 + (j["warmup"] == "auto")))
    print(f"[bench] {len(jobs)} runs: sizes {args.sizes}, lrs {args.lrs}, warmups {', '.join(warmups)}, "
          f"seeds {args.seeds}, {args.jobs} jobs", file=sys.stderr)
    for size in sizes:  # a bad size or override fails here, before any run
        job_config(size, lrs[0], "auto", seeds[0], args.device, list(args.auto))
    results = run_all(jobs, args.jobs)
    order = {(s, lr, w): i for i, (s, lr, w) in enumerate((s, lr, w) for s in sizes for lr in lrs for w in warmups)}
    rows = sorted(summarise(results, args.within), key=lambda c: order[c["size"], c["lr"], c["warmup"]])
    print_table(rows)
    thresholds = {c["size"]: c["threshold"] for c in rows}
    print("\nthreshold (best final val loss of the size + %g): %s" % (
        args.within, ", ".join(f"{s} {t:.3f}" for s, t in thresholds.items())))
    print(f"{len(results)} runs, {sum(r['seconds'] for r in results):.0f} s of training, "
          f"{time.perf_counter() - t0:.0f} s wall")
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k != "loss"} for r in results], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
