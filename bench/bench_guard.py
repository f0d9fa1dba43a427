"""Claims under test: the stability guard's alarm (``guard.action = "warn"``) comes before
loss spikes and blow-ups more often, earlier and with fewer false alarms than a z-score
alarm on the training loss or on the gradient norm; and ``cap`` lets runs that spike or
blow up without it finish, at a validation loss compared with the best unguarded lr.

Runs: the built-in ladder through our trainer (configs/tiny.toml's data, model and
schedule; other sizes as study shapes such as 1x48), an lr sweep made to go unstable (no
gradient clipping by default; no warmup, a short warmup, and a long warmup that ramps the
lr through its stable range, so instabilities also come late, after every detector has
readings), several seeds, ``on_nonfinite=skip`` so a diverged run keeps going. The
monitor measures every step; a guard that measures every k steps is the same run read at
the steps k divides (the monitor never changes training, and ``warn`` does not either),
so every guard setting and cadence is replayed from the one run (``StabilityGuard`` fed
the logged measurements; the replay of the run's own setting is checked against the
alarms the trainer logged).

Two kinds of instability:

* A **spike** is a training loss above the running median of the previous ``--window``
  losses by ``--k`` scaled MADs (1.4826·MAD) and by 5% at least, or a non-finite loss
  (the step is skipped). Consecutive spike steps are one event; an event needs 2
  earlier losses.
* A **blow-up** is the first step (from step 10) where the median of the last 5 losses
  is above ``1 + --rise`` times the lowest such median before it, or a non-finite loss:
  training going backwards, the event a guard should stop or cap before. At most one
  per run.

An **alarm** is the onset of an alarm: the guard's ``stability/alarm`` going 0 -> 1; the
baselines raise theirs when the z-score of the loss (of the gradient norm) against the
previous ``--window`` steps is above z at ``patience`` consecutive steps (checked every
step, where they are free). A spike is **hit** when an alarm began in the ``--horizon``
steps before it (strictly before); a blow-up is **warned** when an alarm began in the
``--blowup-horizon`` steps before it. A **false alarm** is an alarm with no
spike and no blow-up in the ``--horizon`` steps from it; a run without any instability
that alarmed is a **false run**.

The **late** column repeats hits and warned blow-ups for the events from step 30 on,
after every detector has had readings. A **chance** column gives the hits / warned blow-ups of the same alarms shifted in time
by a random offset within their run (mean of 100 shifts): what the alarm rate alone earns.

Every detector family has settings (the guard: threshold, patience, confidence,
smoothing, cadence; the baselines: z, patience). Each family's setting is chosen on the
``--tune-seeds`` (most hits + warned blow-ups with at most ``--max-false`` false alarms per
1000 steps) and scored on the ``--test-seeds``, so no detector is judged on the runs it
was tuned on. The guard's defaults are scored as they are too.

Then every setting whose run was unstable is run again with ``cap`` (the guard's
defaults plus the command line's overrides, at ``--cap-every``).

    python bench/bench_guard.py --quick            # about 15 minutes on 2 CPU cores
    python bench/bench_guard.py                    # docs/guard.md's 180 runs: about 40 minutes
    python bench/bench_guard.py --device cuda --jobs 16 --sizes tiny,1x48,2x96
"""

from __future__ import annotations

import argparse
import itertools
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

LATE = 30
"""Events from this step on come after every detector has had readings (the z-scores'
window fills, the guard has read 2·patience measurements at every 10 steps)."""

GUARD_GRID = {"threshold": (0.8, 1.0, 1.2), "patience": (1, 2, 3), "confidence": (0.0, 1.0),
              "smoothing": (0.0, 0.5, 0.8), "every": (1, 5, 10)}
Z_GRID = {"z": (2.0, 3.0, 4.0), "patience": (1, 2, 3)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny only, 6 lrs, warmups 0/20/150, seeds 0-2 (tune 0,1; test 2), 300 steps")
    p.add_argument("--sizes", default="tiny,1x48", help="presets or LxD shapes")
    p.add_argument("--lrs", default="3e-3,1e-2,3e-2,1e-1,3e-1,1")
    p.add_argument("--warmups", default="0,20,150", help="warmup steps of the lr sweep")
    p.add_argument("--tune-seeds", default="0,1")
    p.add_argument("--test-seeds", default="2,3,4")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--clip", type=float, default=0.0, help="gradient clipping (0: none, so runs can spike)")
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--k", type=float, default=5.0, help="spike: MADs above the running median")
    p.add_argument("--rise", type=float, default=0.2, help="blow-up: rise of the 5-step median over its best")
    p.add_argument("--horizon", type=int, default=25, help="steps an alarm may precede its spike by")
    p.add_argument("--blowup-horizon", type=int, default=50, help="steps an alarm may precede a blow-up by")
    p.add_argument("--max-false", type=float, default=1.0, help="tuning: false alarms per 1000 steps allowed")
    p.add_argument("--cap-every", type=int, default=5, help="monitor cadence of the cap runs")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes)")
    p.add_argument("--save", help="write the warn runs' series to this JSON file")
    p.add_argument("--load", help="read the warn runs from a --save file instead of training them")
    p.add_argument("--no-rescue", action="store_true", help="skip the cap runs")
    p.add_argument("guard", nargs="*", help="guard overrides for the logged run and the cap runs, e.g. guard.patience=1")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.tune_seeds, args.test_seeds = "tiny", "0,1", "2"
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
    """Train one setting; returns its per-step series (lr, loss, grad norm), its
    measurements, the logged alarms and the final validation loss. Runs in a worker."""
    import torch

    torch.set_num_threads(job["threads"])
    logging.getLogger("sharpscope.guard").setLevel(logging.ERROR)
    from sharpscope import metrics as m
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
    lr, loss, grad = ([math.nan] * (steps + 1) for _ in range(3))
    measured: dict[int, tuple] = {}
    alarm: dict[int, float] = {}
    scale, val = 1.0, math.nan
    for r in rows:
        s = r["step"]
        if r.get("lr") is not None:
            lr[s] = r["lr"]
        if r.get("train/skipped"):
            loss[s] = math.inf
        elif r.get("train/loss") is not None:
            loss[s] = r["train/loss"]
        if r.get("train/grad_norm") is not None:
            grad[s] = r["train/grad_norm"]
        failed = [k[len(m.FAILED_PREFIX):] for k in r if k.startswith(m.FAILED_PREFIX)]
        if m.ETA_C in r or failed:
            number = lambda key: math.nan if r.get(key) is None else r[key]  # absent or logged as null
            measured[s] = (number(m.ETA_C), failed[0] if failed else "ok", number(m.ETA_C_SE),
                           number(m.DESCENT_STEP))
        if m.STABILITY_ALARM in r:
            alarm[s] = r[m.STABILITY_ALARM]
        scale = min(scale, r.get(m.STABILITY_LR_SCALE, 1.0))
        if r.get("eval/loss") is not None:
            val = r["eval/loss"]
    return {**job, "lr_at": lr, "loss": loss, "grad": grad, "measured": measured, "alarm": alarm, "val": val,
            "min_scale": scale, "seconds": time.perf_counter() - t0}


# ---- instabilities ------------------------------------------------------------------------

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


def blowup_onset(loss: list[float], rise: float, start: int = 10) -> int | None:
    """The first step from ``start`` where the median of the last 5 losses is above
    (1 + rise) x the lowest such median before it, or the loss is not finite; None if never."""
    best = math.inf
    for s in range(1, len(loss)):
        if loss[s] == math.inf and s >= start:
            return s
        recent = [x for x in loss[max(1, s - 4):s + 1] if math.isfinite(x)]
        if len(recent) < 5:
            continue
        med = statistics.median(recent)
        if s >= start and med > (1 + rise) * best:
            return s
        best = min(best, med)
    return None


# ---- detectors ----------------------------------------------------------------------------

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


def guard_alarms(run: dict, setting: dict) -> list[int]:
    """Alarm onsets of a warn guard with ``setting`` (GuardSettings fields + ``every``)
    replayed on the run's measurements at the steps ``every`` divides."""
    from sharpscope.curvature.guard import GuardSettings, StabilityGuard

    fields = {k: v for k, v in setting.items() if k != "every"}
    guard = StabilityGuard(GuardSettings(**{**fields, "action": "warn"}))
    onsets = []
    for s in sorted(run["measured"]):
        if s % setting["every"]:
            continue
        eta, status, se, descent = run["measured"][s]
        guard.update(step=s, lr=run["lr_at"][s], eta=eta, status=status, eta_se=se, descent_step=descent)
        if guard.event == "alarm":
            onsets.append(s)
    return onsets


def logged_alarms(alarm: dict[int, float]) -> list[int]:
    onsets, was = [], 0.0
    for s in sorted(alarm):
        if alarm[s] and not was:
            onsets.append(s)
        was = alarm[s]
    return onsets


class Score:
    """Hits, leads and false alarms of one detector setting over a set of runs."""

    def __init__(self):
        self.spikes = self.hits = self.blowups = self.warned = self.false = self.steps = 0
        self.quiet_runs = self.false_runs = 0
        self.late = [0, 0, 0, 0]  # spikes, hits, blow-ups, warned: events from step LATE on
        self.leads: list[int] = []
        self.blowup_leads: list[int] = []

    def add(self, alarms: list[int], spikes: list[int], blowup: int | None, steps: int, horizon: int,
            blowup_horizon: int) -> None:
        self.steps += steps
        self.spikes += len(spikes)
        for spike in spikes:
            before = [a for a in alarms if spike - horizon <= a < spike]
            if before:
                self.hits += 1
                self.leads.append(spike - max(before))
            if spike >= LATE:
                self.late[0] += 1
                self.late[1] += bool(before)
        events = spikes + ([blowup] if blowup is not None else [])
        self.false += sum(1 for a in alarms if not any(a <= e <= a + horizon for e in events))
        if blowup is not None:
            self.blowups += 1
            before = [a for a in alarms if blowup - blowup_horizon <= a < blowup]
            warned = bool(before)
            if warned:
                self.warned += 1
                self.blowup_leads.append(blowup - max(before))
            if blowup >= LATE:
                self.late[2] += 1
                self.late[3] += warned
        elif not spikes:
            self.quiet_runs += 1
            self.false_runs += bool(alarms)

    @property
    def false_rate(self) -> float:
        return 1000 * self.false / self.steps if self.steps else math.nan

    def key(self, max_false: float) -> tuple:
        """Tuning order: allowed false-alarm rate first, then hits, then fewer false alarms."""
        return (self.false_rate <= max_false, self.hits + self.warned, -self.false)

    def row(self, name: str, setting: str = "", by_chance: str = "") -> str:
        med = statistics.median(self.leads) if self.leads else math.nan
        bmed = statistics.median(self.blowup_leads) if self.blowup_leads else math.nan
        late = f"{self.late[1]}/{self.late[0]}, {self.late[3]}/{self.late[2]}"
        return (f"{name:<24} {f'{self.hits}/{self.spikes}':>9} {fmt(med, '.0f'):>6} "
                f"{f'{self.warned}/{self.blowups}':>9} {fmt(bmed, '.0f'):>6} {late:>12} {fmt(self.false_rate, '.2f'):>9} "
                f"{f'{self.false_runs}/{self.quiet_runs}':>10} {by_chance:>11}  {setting}")


HEADER = (f"{'detector':<24} {'spikes hit':>9} {'lead':>6} {'blow-ups':>9} {'lead':>6} {'late: both':>12} "
          f"{'false/1k':>9} {'false runs':>10} {'chance':>11}  setting")


def score_runs(runs: list[dict], alarms: list[list[int]], args) -> Score:
    """The score of one detector whose alarm onsets in each run are ``alarms``."""
    score = Score()
    for r, a in zip(runs, alarms):
        score.add(a, r["spikes"], r["blowup"], args.steps, args.horizon, args.blowup_horizon)
    return score


def chance(runs: list[dict], alarms: list[list[int]], args, reps: int = 100) -> str:
    """The hits and warned blow-ups expected by chance: each run's alarms shifted
    circularly by a random offset (same number and spacing of alarms, same runs, timing
    unrelated to the events), mean over ``reps`` shifts."""
    import random

    rng = random.Random(0)
    hits = warned = 0
    for _ in range(reps):
        score = Score()
        for r, a in zip(runs, alarms):
            shift = rng.randrange(1, args.steps)
            moved = sorted((x + shift - 1) % args.steps + 1 for x in a)
            score.add(moved, r["spikes"], r["blowup"], args.steps, args.horizon, args.blowup_horizon)
        hits += score.hits
        warned += score.warned
    return f"{hits / reps:.1f} / {warned / reps:.1f}"


def grid(spec: dict) -> list[dict]:
    return [dict(zip(spec, values)) for values in itertools.product(*spec.values())]


def describe(setting: dict) -> str:
    """The tuned fields of a setting (a guard's other options do not change its alarms
    or are left at the run's own)."""
    return " ".join(f"{k}={v:g}" for k, v in setting.items() if k in GUARD_GRID or k in Z_GRID)


# ---- the bench ----------------------------------------------------------------------------

def jobs_for(args, action: str, settings, every: int) -> list[dict]:
    threads = 1 if args.device == "cpu" else 2
    return [dict(size=size, lr=lr, warmup=warmup, seed=seed, action=action, steps=args.steps, every=every,
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
    tune_seeds = [int(x) for x in args.tune_seeds.split(",")]
    test_seeds = [int(x) for x in args.test_seeds.split(",")]
    from sharpscope.curvature.guard import GuardSettings

    own = GuardSettings().as_dict()
    for item in args.guard:
        key, value = item.split("=", 1)
        name = key.removeprefix("guard.")
        own[name] = type(own[name])(value)
    own.pop("action")
    own_setting = {**own, "every": 1}  # the logged runs' guard, read at every step

    settings = [(s, lr, w, seed) for s in sizes for lr in lrs for w in warmups for seed in tune_seeds + test_seeds]
    t0 = time.perf_counter()
    if args.load:
        runs = json.loads(Path(args.load).read_text())
        for r in runs:  # JSON keys are strings; non-finite losses were written as null
            r["measured"] = {int(s): tuple(math.nan if v is None else v for v in m) for s, m in r["measured"].items()}
            r["alarm"] = {int(s): a for s, a in r["alarm"].items()}
            for key in ("lr_at", "loss", "grad"):
                r[key] = [math.nan if v is None else math.inf if v == "inf" else v for v in r[key]]
        runs = [r for r in runs if (r["size"], r["lr"], r["warmup"], r["seed"]) in set(settings)]
    else:
        runs = run_all(jobs_for(args, "warn", settings, every=1), args.jobs)
    if args.save:
        clean = lambda xs: ["inf" if x == math.inf else None if not math.isfinite(x) else x for x in xs]
        Path(args.save).write_text(json.dumps([
            {**r, "lr_at": clean(r["lr_at"]), "loss": clean(r["loss"]), "grad": clean(r["grad"]),
             "measured": {s: [None if isinstance(v, float) and not math.isfinite(v) else v for v in m]
                          for s, m in r["measured"].items()}} for r in runs]))
    print(f"# {len(runs)} warn runs ({args.steps} steps, measured every step, clip {args.clip}, device "
          f"{args.device}, jobs {args.jobs}) in {time.perf_counter() - t0:.0f} s; guard overrides: "
          f"{' '.join(args.guard) or 'none (defaults)'}")
    mismatched = 0
    for r in runs:
        r["spikes"] = spike_events(r["loss"], args.window, args.k)
        r["blowup"] = blowup_onset(r["loss"], args.rise)
        replay = guard_alarms(r, own_setting)
        mismatched += replay != logged_alarms(r["alarm"])
    print(f"replayed guard (the runs' own setting) = logged alarms: {len(runs) - mismatched}/{len(runs)} runs")

    print("\nper run: spike onsets | blow-up | guard alarm onsets (own setting, every step) | final val loss")
    for r in runs:
        diverged = sum(1 for x in r["loss"] if x == math.inf)
        print(f"  {r['size']:>6} lr {r['lr']:<6g} warmup {r['warmup']:>3} seed {r['seed']}: spikes {r['spikes']}"
              f"{f' ({diverged} non-finite steps)' if diverged else ''} | {r['blowup']} | "
              f"{logged_alarms(r['alarm'])} | {fmt(r['val'])}")

    tune = [r for r in runs if r["seed"] in tune_seeds]
    test = [r for r in runs if r["seed"] in test_seeds]
    families = {
        "guard (lr/eta_c)": (grid(GUARD_GRID), lambda s: (lambda r: guard_alarms(r, s))),
        "loss z-score": (grid(Z_GRID), lambda s: (lambda r: zscore_alarms(r["loss"], args.window, s["z"],
                                                                         s["patience"]))),
        "grad-norm z-score": (grid(Z_GRID), lambda s: (lambda r: zscore_alarms(r["grad"], args.window, s["z"],
                                                                              s["patience"]))),
    }
    print(f"\nearly warning. spike = loss > running median + {args.k:g} MAD (window {args.window}) or non-finite, "
          f"hit = alarm onset 1-{args.horizon} steps before; blow-up = 5-step median > {1 + args.rise:g} x its best, "
          f"warned = alarm onset 1-{args.blowup_horizon} steps before; false = alarm with no event in "
          f"{args.horizon} steps; false runs = alarmed runs of those with no event")
    n_events = lambda rs: (sum(len(r["spikes"]) for r in rs), sum(r["blowup"] is not None for r in rs))
    for label, rs in (("tuning", tune), ("test", test)):
        spikes, blowups = n_events(rs)
        print(f"  {label} seeds: {len(rs)} runs, {spikes} spikes, {blowups} blow-ups")
    print(f"\nsettings chosen on seeds {args.tune_seeds} (most hits + warned blow-ups with at most "
          f"{args.max_false:g} false alarms / 1000 steps), scored on seeds {args.test_seeds}:")
    print(HEADER)
    for name, (candidates, detector) in families.items():
        alarms_in = lambda rs, s: [detector(s)(r) for r in rs]
        scored = [(score_runs(tune, alarms_in(tune, s), args), s) for s in candidates]
        best_tune, best = max(scored, key=lambda x: x[0].key(args.max_false))
        print(best_tune.row(f"{name}, tuning", describe(best), chance(tune, alarms_in(tune, best), args)))
        test_alarms = alarms_in(test, best)
        print(score_runs(test, test_alarms, args).row(f"{name}, test", describe(best),
                                                      chance(test, test_alarms, args)))
    print("\nthe guard at its own setting, every k steps (all seeds):")
    print(HEADER)
    for every in GUARD_GRID["every"]:
        setting = {**own_setting, "every": every}
        alarms = [guard_alarms(r, setting) for r in runs]
        print(score_runs(runs, alarms, args).row("guard, own setting", describe(setting),
                                                 chance(runs, alarms, args)))

    # Rescue.
    unstable = [r for r in runs if r["spikes"] or r["blowup"] is not None]
    if args.no_rescue:
        return 0
    if not unstable:
        print("\nrescue: no run spiked or blew up; nothing to rescue")
        return 0
    t1 = time.perf_counter()
    capped = run_all(jobs_for(args, "cap", [(r["size"], r["lr"], r["warmup"], r["seed"]) for r in unstable],
                              every=args.cap_every), args.jobs)
    print(f"\nrescue: {len(capped)} cap runs (monitor every {args.cap_every}) in {time.perf_counter() - t1:.0f} s, "
          "the unstable settings; best = lowest final val loss over the unguarded lr sweep of the same size, "
          "warmup and seed")
    print(f"{'size':>6} {'lr':>7} {'warmup':>6} {'seed':>4} {'spikes':>6} {'blow-up':>7} {'val none':>9} "
          f"{'val cap':>8} {'spikes cap':>10} {'blow-up cap':>11} {'min scale':>9} {'best lr':>8} {'val best':>9}")
    better = worse = 0
    for r, c in zip(unstable, capped):
        peers = [w for w in runs if (w["size"], w["warmup"], w["seed"]) == (r["size"], r["warmup"], r["seed"])
                 and math.isfinite(w["val"])]
        best = min(peers, key=lambda w: w["val"]) if peers else None
        c_blowup = blowup_onset(c["loss"], args.rise)
        better += c["val"] < r["val"] - 0.01
        worse += c["val"] > r["val"] + 0.01
        print(f"{r['size']:>6} {r['lr']:>7g} {r['warmup']:>6} {r['seed']:>4} {len(r['spikes']):>6} "
              f"{fmt(r['blowup'], 'd') if r['blowup'] is not None else '-':>7} {fmt(r['val']):>9} "
              f"{fmt(c['val']):>8} {len(spike_events(c['loss'], args.window, args.k)):>10} "
              f"{c_blowup if c_blowup is not None else '-':>11} {c['min_scale']:>9.3g} "
              f"{(format(best['lr'], 'g') if best else '-'):>8} {fmt(best['val'] if best else math.nan):>9}")
    print(f"cap: val loss lower by > 0.01 in {better}, higher by > 0.01 in {worse} of {len(capped)} runs")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
