"""Claims under test: the stability guard's alarm (``guard.action = "warn"``) comes before
loss spikes more often, earlier and with fewer false alarms than a z-score alarm on the
training loss or on the gradient norm; and ``cap`` lets runs that spike or diverge
without it finish, at a validation loss compared with the best unguarded lr.

Runs: the built-in ladder through our trainer (configs/tiny.toml's data, model and
schedule; other sizes as study shapes such as 2x96), an lr sweep made to spike (no
gradient clipping by default, without and with a short warmup, several seeds), the
monitor every ``--every`` steps, ``on_nonfinite=skip`` so a diverged run keeps going.

* A **spike** is a training loss above the running median of the previous ``--window``
  losses by ``--k`` scaled MADs (1.4826·MAD) and by 5% at least, or a non-finite loss
  (divergence: the step is skipped). Consecutive spike steps are one event; an event
  needs 2 earlier losses (so spikes in the first steps of a run without warmup count).
* An **alarm** is the onset of an alarm: the guard's ``stability/alarm`` going 0 -> 1 at a
  measurement; the baselines raise theirs when the z-score of the loss (of the gradient
  norm) against the previous ``--window`` steps is above ``--z`` at ``patience``
  consecutive steps (the guard's patience, checked every step, where they are free).
* A spike is **hit** when an alarm began in the ``--horizon`` steps before it (strictly
  before: an alarm at the spike's own step did not warn). Lead time = spike step - alarm
  step. A **false alarm** is an alarm with no spike in the ``--horizon`` steps from it.

Warn never changes training, so one warn run per setting serves all three detectors.
Then every setting whose warn run spiked or diverged is run again with ``cap``.

    python bench/bench_guard.py --quick            # a few minutes on 2 CPU cores
    python bench/bench_guard.py --device cuda --jobs 16
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.toml"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny only, 4 lrs, 1 seed, 150 steps")
    p.add_argument("--sizes", default="tiny,2x96", help="presets or LxD shapes")
    p.add_argument("--lrs", default="3e-3,1e-2,3e-2,1e-1,3e-1")
    p.add_argument("--warmups", default="0,20", help="warmup steps of the lr sweep")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--every", type=int, default=5, help="monitor cadence (steps)")
    p.add_argument("--clip", type=float, default=0.0, help="gradient clipping (0: none, so runs can spike)")
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--k", type=float, default=5.0, help="spike: MADs above the running median")
    p.add_argument("--z", type=float, default=3.0, help="baselines: z-score threshold")
    p.add_argument("--horizon", type=int, default=25, help="steps an alarm may precede its spike by")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    p.add_argument("guard", nargs="*", help="guard overrides, e.g. guard.threshold=1.5")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.lrs, args.seeds, args.steps = "tiny", "3e-3,3e-2,1e-1,3e-1", "0", 150
    return args


# ---- one run ----------------------------------------------------------------------------

def size_overrides(size: str) -> list[str]:
    from sharpscope.experiments.plan import parse_shape
    from sharpscope.training.model import PRESETS

    if size in PRESETS:
        return [f"model.preset={size}"]
    layers, heads, width = parse_shape(size)
    return [f"model.n_layer={layers}", f"model.n_head={heads}", f"model.d_model={width}"]


def train_one(job: dict) -> dict:
    """Train one setting; returns its per-step series (loss, grad norm, alarm) and final
    validation loss. Runs in a worker process."""
    import torch

    torch.set_num_threads(job["threads"])
    logging.getLogger("sharpscope.guard").setLevel(logging.ERROR)
    from sharpscope.config import load_config
    from sharpscope.training.config import TrainConfig
    from sharpscope.training.trainer import Trainer

    overrides = [
        "progress=false", f"steps={job['steps']}", f"seed={job['seed']}", f"device={job['device']}",
        f"optim.lr={job['lr']}", f"optim.grad_clip={job['clip']}", f"schedule.warmup_steps={job['warmup']}",
        f"monitor.every={job['every']}", "monitor.exact_every=0", "eval.every=0", "eval.arithmetic_problems=0",
        "checkpoint.every=0", "checkpoint.keep=1", "on_nonfinite=skip", f"guard.action={job['action']}",
        *size_overrides(job["size"]), *job["guard"],
    ]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(load_config(TrainConfig, TINY, overrides), Path(tmp) / "run").run()
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = job["steps"]
    loss = [math.nan] * (steps + 1)
    grad = [math.nan] * (steps + 1)
    alarm: dict[int, float] = {}
    scale = 1.0
    val = math.nan
    for r in rows:
        s = r["step"]
        if r.get("train/skipped"):
            loss[s] = math.inf
        elif r.get("train/loss") is not None:
            loss[s] = r["train/loss"]
        if r.get("train/grad_norm") is not None:
            grad[s] = r["train/grad_norm"]
        if "stability/alarm" in r:
            alarm[s] = r["stability/alarm"]
        scale = min(scale, r.get("stability/lr_scale", 1.0))
        if r.get("eval/loss") is not None:
            val = r["eval/loss"]
    return {**job, "loss": loss, "grad": grad, "alarm": alarm, "val": val, "min_scale": scale,
            "seconds": time.perf_counter() - t0}


# ---- detectors ----------------------------------------------------------------------------

def spike_events(loss: list[float], window: int, k: float) -> list[int]:
    """Steps where a spike event begins (see the module docstring)."""
    events, inside = [], False
    for s in range(1, len(loss)):
        past = [x for x in loss[max(1, s - window):s] if math.isfinite(x)]
        x = loss[s]
        spike = False
        if x == math.inf:
            spike = True
        elif math.isfinite(x) and len(past) >= 2:
            med = statistics.median(past)
            mad = 1.4826 * statistics.median(abs(p - med) for p in past)
            spike = x > med + k * mad and x > 1.05 * med
        if spike and not inside:
            events.append(s)
        inside = spike
    return events


def zscore_alarms(series: list[float], window: int, z: float, patience: int) -> list[int]:
    """Onsets of a z-score alarm: above ``z`` at ``patience`` consecutive steps."""
    onsets, run = [], 0
    for s in range(1, len(series)):
        past = [x for x in series[max(1, s - window):s] if math.isfinite(x)]
        x = series[s]
        high = False
        if len(past) >= 3:
            mean = statistics.fmean(past)
            sd = statistics.pstdev(past)
            high = x == math.inf or (math.isfinite(x) and sd > 0 and (x - mean) / sd > z)
        run = run + 1 if high else 0
        if run == patience:
            onsets.append(s)
    return onsets


def guard_alarms(alarm: dict[int, float]) -> list[int]:
    onsets, was = [], 0.0
    for s in sorted(alarm):
        if alarm[s] and not was:
            onsets.append(s)
        was = alarm[s]
    return onsets


def score(alarms: list[int], spikes: list[int], horizon: int) -> tuple[int, list[int], int]:
    """(hits, lead times of the hits, false alarms)."""
    leads = []
    for spike in spikes:
        before = [a for a in alarms if spike - horizon <= a < spike]
        if before:
            leads.append(spike - max(before))
    false = sum(1 for a in alarms if not any(a <= s <= a + horizon for s in spikes))
    return len(leads), leads, false


# ---- the bench ----------------------------------------------------------------------------

def jobs_for(args, action: str, settings) -> list[dict]:
    threads = 1 if args.device == "cpu" else 2
    return [dict(size=size, lr=lr, warmup=warmup, seed=seed, action=action, steps=args.steps, every=args.every,
                 clip=args.clip, device=args.device, guard=list(args.guard), threads=threads)
            for size, lr, warmup, seed in settings]


def run_all(jobs: list[dict], n: int) -> list[dict]:
    if n <= 1:
        return [train_one(j) for j in jobs]
    import multiprocessing

    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(train_one, jobs))


def fmt(x: float, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = args.sizes.split(",")
    lrs = [float(x) for x in args.lrs.split(",")]
    warmups = [int(x) for x in args.warmups.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    from sharpscope.curvature.guard import GuardSettings

    patience = GuardSettings().patience
    for item in args.guard:
        if item.startswith("guard.patience="):
            patience = int(item.split("=", 1)[1])
    settings = [(s, lr, w, seed) for s in sizes for lr in lrs for w in warmups for seed in seeds]
    t0 = time.perf_counter()
    warn = run_all(jobs_for(args, "warn", settings), args.jobs)
    print(f"# {len(warn)} warn runs ({args.steps} steps, monitor every {args.every}, clip {args.clip}, "
          f"device {args.device}, jobs {args.jobs}) in {time.perf_counter() - t0:.0f} s; guard overrides: "
          f"{' '.join(args.guard) or 'none (defaults)'}")

    # Early warning.
    totals = {name: [0, [], 0] for name in ("guard (lr/eta_c)", "loss z-score", "grad-norm z-score")}
    n_spikes = n_steps = 0
    per_run = []
    for r in warn:
        spikes = spike_events(r["loss"], args.window, args.k)
        r["spikes"] = spikes
        n_spikes += len(spikes)
        n_steps += args.steps
        detectors = {"guard (lr/eta_c)": guard_alarms(r["alarm"]),
                     "loss z-score": zscore_alarms(r["loss"], args.window, args.z, patience),
                     "grad-norm z-score": zscore_alarms(r["grad"], args.window, args.z, patience)}
        for name, alarms in detectors.items():
            hits, leads, false = score(alarms, spikes, args.horizon)
            totals[name][0] += hits
            totals[name][1] += leads
            totals[name][2] += false
        per_run.append((r, spikes, detectors))
    print("\nper run: spike onsets | alarm onsets (guard; loss z; grad z) | final val loss")
    for r, spikes, d in per_run:
        diverged = sum(1 for x in r["loss"] if x == math.inf)
        print(f"  {r['size']:>6} lr {r['lr']:<6g} warmup {r['warmup']:>3} seed {r['seed']}: spikes {spikes}"
              f"{f' ({diverged} non-finite steps)' if diverged else ''} | {d['guard (lr/eta_c)']}; "
              f"{d['loss z-score']}; {d['grad-norm z-score']} | {fmt(r['val'])}")
    print(f"\nearly warning: {n_spikes} spike events in {len(warn)} runs, {n_steps} steps; "
          f"spike = loss > running median + {args.k:g} MAD (window {args.window}) or non-finite; "
          f"hit = alarm onset 1-{args.horizon} steps before; patience {patience}")
    print(f"{'detector':<20} {'hit rate':>10} {'median lead':>12} {'mean lead':>10} {'false/1000 steps':>17}")
    for name, (hits, leads, false) in totals.items():
        rate = f"{hits}/{n_spikes}" if n_spikes else "-"
        print(f"{name:<20} {rate:>10} {fmt(statistics.median(leads) if leads else math.nan, '.0f'):>12} "
              f"{fmt(statistics.fmean(leads) if leads else math.nan, '.1f'):>10} "
              f"{fmt(1000 * false / n_steps, '.2f'):>17}")

    # Rescue.
    spiky = [r for r in warn if r["spikes"]]
    if not spiky:
        print("\nrescue: no warn run spiked or diverged; nothing to rescue")
        return 0
    t1 = time.perf_counter()
    capped = run_all(jobs_for(args, "cap", [(r["size"], r["lr"], r["warmup"], r["seed"]) for r in spiky]), args.jobs)
    print(f"\nrescue: {len(capped)} cap runs in {time.perf_counter() - t1:.0f} s (the settings that spiked); best = "
          "lowest final val loss over the unguarded lr sweep of the same size, warmup and seed")
    print(f"{'size':>6} {'lr':>7} {'warmup':>6} {'seed':>4} {'spikes':>6} {'val none':>9} {'val cap':>8} "
          f"{'spikes cap':>10} {'min scale':>9} {'finite':>7} {'best lr':>8} {'val best':>9}")
    for r, c in zip(spiky, capped):
        peers = [w for w in warn if (w["size"], w["warmup"], w["seed"]) == (r["size"], r["warmup"], r["seed"])
                 and math.isfinite(w["val"])]
        best = min(peers, key=lambda w: w["val"]) if peers else None
        c_spikes = spike_events(c["loss"], args.window, args.k)
        finite = "yes" if math.isfinite(c["val"]) and all(x != math.inf for x in c["loss"]) else "no"
        print(f"{r['size']:>6} {r['lr']:>7g} {r['warmup']:>6} {r['seed']:>4} {len(r['spikes']):>6} "
              f"{fmt(r['val']):>9} {fmt(c['val']):>8} {len(c_spikes):>10} {c['min_scale']:>9.3g} {finite:>7} "
              f"{(format(best['lr'], 'g') if best else '-'):>8} {fmt(best['val'] if best else math.nan):>9}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
