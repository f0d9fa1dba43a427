"""The measured study: a grid of real training runs, each with the live sharpness monitor.

A scale ladder (every size, every seed, the ladder schedule) plus the other schedules at a
few of the sizes, written as runs of the shared format under ``OUT/runs/`` so that the
same analysis that reads the simulated study reads this one. Runs are the unit of work:
a re-run skips finished runs, resumes unfinished ones from their last checkpoint and
starts the rest, so an interrupted study loses at most one run's progress since its last
checkpoint.

Token budgets are compute-matched by a fixed ratio of training tokens to parameters
(``budget.tokens_per_param``, 20 by default: the compute-optimal ratio of Hoffmann et al.,
2022). Every model is then trained equally far relative to its size, and compute
C ≈ 6·N·D grows as N² across the ladder. ``budget.min_steps`` keeps the smallest models
long enough to show a trajectory; every cadence (monitor, exact measures, evaluation,
warmup, checkpoints) is a fixed fraction of each run, so all runs log the same number of
points over t ∈ [0, 1].
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import to_dict
from ..errors import UserError
from ..runs import atomic_write_text
from ..training.config import TrainConfig
from ..training.model import PRESETS, GPT, GPTConfig, count_parameters
from .mix import DrawFigures as DrawMixFigures, MixStudyConfig, run_mix_study
from .nexus import DrawFigures as DrawNexusFigures, NexusStudyConfig, run_nexus_study
from .plan import is_lead, parse_shape, run_state, stored_train_settings, train_from_state, with_current_defaults

SCHEDULES = ("cosine", "linear", "constant", "wsd", "cosine_restarts")
PLAN_FILE = "study.json"
# Seconds per step grow about linearly in N with a fixed per-step cost; on 2 CPU cores the
# fixed part is worth about this many parameters (measured on the default ladder). It only
# weights the progress estimate.
_STEP_OVERHEAD_PARAMS = 56_000


@dataclass
class BudgetConfig:
    tokens_per_param: float = 20.0
    """Training tokens per parameter, D = r·N (20: the compute-optimal ratio of Hoffmann
    et al. 2022). Steps = ceil(D / (batch_size · block_size))."""
    min_steps: int = 200
    """Fewest steps of any run (the smallest models would otherwise end before warmup)."""
    max_steps: int = 0
    """Most steps of any run (0 = no cap); a capped run records its real token count."""


@dataclass
class StudyConfig:
    name: str = "study"
    """Study name (recorded in study.json and the report title)."""
    sizes: list[str] = field(default_factory=lambda: ["1x24", "1x48", "2x64", "2x96", "3x128"])
    """The scale ladder: preset names (nano, tiny, mini ...) or shapes LAYERSxWIDTH or
    LAYERSxHEADSxWIDTH (heads default to width/32, at least 1). The default spans
    about 15K to 640K parameters (1.6 decades) with the byte vocabulary."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of the ladder runs (initialisation, data order)."""
    ladder_schedule: str = "cosine"
    """Learning-rate schedule of the ladder runs."""
    schedules: list[str] = field(default_factory=lambda: list(SCHEDULES))
    """Schedules compared at ``schedule_sizes`` (the ladder schedule's runs are shared)."""
    schedule_sizes: list[str] = field(default_factory=lambda: ["1x48", "2x64", "2x96"])
    """Sizes (from ``sizes``) at which every schedule is run."""
    schedule_seeds: list[int] = field(default_factory=lambda: [0])
    """Seeds of the schedule runs."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    warmup_fraction: float = 0.05
    """Warmup as a fraction of each run's steps."""
    monitor_points: int = 100
    """Critical-sharpness measurements per run (monitor.every = steps / this)."""
    exact_points: int = 10
    """λ_max / trace / preconditioned-sharpness measurements per run (0 = none)."""
    eval_points: int = 10
    """Validation passes per run, besides the one at the start."""
    checkpoint_points: int = 4
    """Checkpoints per run (resume granularity); only the latest is kept."""
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        model=dataclasses.replace(TrainConfig().model, block_size=64),
        data=dataclasses.replace(TrainConfig().data, sources=["code", "prose", "arithmetic"])))
    """Settings shared by every run (data, optimizer, monitor method, eval batches ...).
    The study sets name, group, seed, steps, model shape, schedule and cadences itself."""
    mix: MixStudyConfig = field(default_factory=MixStudyConfig)
    """The data-mix advisor on a base model of its own (off unless mix.enabled)."""
    nexus: NexusStudyConfig = field(default_factory=NexusStudyConfig)
    """AdamW vs Nexus at matched loss: gradient agreement and minima distance (off unless
    nexus.enabled)."""


@dataclass
class PlannedRun:
    name: str
    size: str
    shape: tuple[int, int, int]
    n_params: int
    seed: int
    schedule: str
    groups: list[str]
    config: TrainConfig

    @property
    def steps(self) -> int:
        return self.config.steps

    @property
    def tokens(self) -> int:
        return self.config.steps * self.config.data.batch_size * self.config.model.block_size

    @property
    def cost(self) -> float:
        """Relative compute of the run (for the progress estimate)."""
        return self.steps * (self.n_params + _STEP_OVERHEAD_PARAMS) * self.config.data.batch_size


def _n_params(shape: tuple[int, int, int], train: TrainConfig, vocab_size: int) -> int:
    import torch

    layers, heads, width = shape
    with torch.device("meta"):  # counts shapes only; allocates nothing
        model = GPT(GPTConfig(vocab_size=vocab_size, block_size=train.model.block_size, n_layer=layers,
                              n_head=heads, d_model=width, positions=train.model.positions,
                              tie_embeddings=train.model.tie_embeddings))
    return count_parameters(model)


def _check(cfg: StudyConfig) -> None:
    if len(cfg.sizes) < 3:
        raise UserError(f"the study has {len(cfg.sizes)} size(s); fitting across scales needs at least 3 in 'sizes'")
    if len(set(cfg.sizes)) != len(cfg.sizes):
        raise UserError("'sizes' lists a size twice; list each once")
    if not cfg.seeds:
        raise UserError("'seeds' is empty; give at least one seed")
    for name in [cfg.ladder_schedule, *cfg.schedules]:
        if name not in SCHEDULES:
            raise UserError(f"unknown schedule '{name}'; choose from {', '.join(SCHEDULES)}")
    missing = [s for s in cfg.schedule_sizes if s not in cfg.sizes]
    if missing:
        raise UserError(f"schedule_sizes {missing} are not in 'sizes'; pick schedule sizes from the ladder")
    if cfg.budget.tokens_per_param <= 0 or cfg.budget.min_steps < 1 or cfg.budget.max_steps < 0:
        raise UserError("budget: tokens_per_param must be > 0, min_steps ≥ 1 and max_steps ≥ 0")
    if not 0 <= cfg.warmup_fraction < 1:
        raise UserError(f"warmup_fraction must be in [0, 1), got {cfg.warmup_fraction}")
    for key in ("monitor_points", "exact_points", "eval_points", "checkpoint_points"):
        if getattr(cfg, key) < 0:
            raise UserError(f"'{key}' must be ≥ 0")


def _every(steps: int, points: int) -> int:
    return max(1, steps // points) if points > 0 else 0


def plan_study(cfg: StudyConfig, *, vocab_size: int = 256) -> list[PlannedRun]:
    """Every run of the grid, with its resolved TrainConfig; validates before anything runs."""
    _check(cfg)
    if cfg.train.data.tokenizer != "bytes":
        vocab_size = cfg.train.data.vocab_size
    tokens_per_step = cfg.train.data.batch_size * cfg.train.model.block_size
    runs: list[PlannedRun] = []
    # Ordered so that every prefix of the grid is a usable study: the ladder at the first
    # seed, then the schedule runs, then the ladder at the other seeds.
    cells: list[tuple[str, int, str, list[str]]] = []
    first, *other_seeds = cfg.seeds

    def ladder(seed: int) -> None:
        for size in cfg.sizes:
            extra = ["schedules"] if (size in cfg.schedule_sizes and cfg.ladder_schedule in cfg.schedules
                                      and seed in cfg.schedule_seeds) else []
            cells.append((size, seed, cfg.ladder_schedule, ["scales", *extra]))

    ladder(first)
    for size in cfg.schedule_sizes:
        for schedule in cfg.schedules:
            if schedule == cfg.ladder_schedule:
                continue
            for seed in cfg.schedule_seeds:
                cells.append((size, seed, schedule, ["schedules"]))
    for seed in other_seeds:
        ladder(seed)
    shapes = {size: parse_shape(size) for size in cfg.sizes}
    counts = {size: _n_params(shapes[size], cfg.train, vocab_size) for size in cfg.sizes}
    for size, seed, schedule, groups in cells:
        n = counts[size]
        steps = max(cfg.budget.min_steps, math.ceil(cfg.budget.tokens_per_param * n / tokens_per_step))
        if cfg.budget.max_steps:
            steps = min(steps, cfg.budget.max_steps)
        layers, heads, width = shapes[size]
        name = f"{size}-{schedule}-s{seed}"
        t = dataclasses.replace(
            cfg.train, name=name, group=groups[0], groups=groups[1:], seed=seed, steps=steps, progress=False,
            model=dataclasses.replace(cfg.train.model, preset=size if size in PRESETS else cfg.train.model.preset,
                                      n_layer=layers, n_head=heads, d_model=width),
            schedule=dataclasses.replace(cfg.train.schedule, name=schedule,
                                         warmup_steps=int(round(cfg.warmup_fraction * steps))),
            monitor=dataclasses.replace(cfg.train.monitor, every=_every(steps, cfg.monitor_points),
                                        exact_every=_every(steps, cfg.exact_points)),
            eval=dataclasses.replace(cfg.train.eval, every=_every(steps, cfg.eval_points)),
            checkpoint=dataclasses.replace(cfg.train.checkpoint, every=_every(steps, cfg.checkpoint_points), keep=1))
        runs.append(PlannedRun(name=name, size=size, shape=(layers, heads, width), n_params=n, seed=seed,
                               schedule=schedule, groups=groups, config=t))
    return runs


# --- running ---------------------------------------------------------------------------

def _plan_record(cfg: StudyConfig, runs: list[PlannedRun]) -> dict[str, Any]:
    return {"name": cfg.name, "config": to_dict(cfg),
            "runs": [{"name": r.name, "size": r.size, "shape": list(r.shape), "n_params": r.n_params,
                      "seed": r.seed, "schedule": r.schedule, "groups": r.groups, "steps": r.steps,
                      "tokens": r.tokens} for r in runs]}


_OWN_STATE = ("mix", "nexus")


def _check_plan(out: Path, record: dict[str, Any], force: bool) -> None:
    """Refuse to mix two different grids in one directory (their runs would not compare)."""
    path = out / PLAN_FILE
    if not path.exists() or force:
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{path} is not valid JSON; delete it or pass --force to re-plan the study") from None
    stored = with_current_defaults(StudyConfig, old.get("config", {}))
    # the mix advisor and the Nexus comparison keep (and check) their own state
    grid = {k: v for k, v in record["config"].items() if k not in _OWN_STATE}
    stored = {k: v for k, v in (stored or {}).items() if k not in _OWN_STATE} if stored is not None else None
    if stored != grid:
        changed = sorted(k for k in set(stored or {}) | set(grid) if (stored or {}).get(k) != grid.get(k))
        raise UserError(f"'{out}' holds a study planned with other settings (differs in: {', '.join(changed)}); "
                        "use another --out, or pass --force to replace the runs whose settings changed")


class _GridProgress:
    """One line for the whole grid: which run, share of compute done, ETA from the rate of
    compute units measured so far in this invocation (finished runs count as done)."""

    def __init__(self, runs: list[PlannedRun], done_cost: float, enabled: bool):
        self.total = sum(r.cost for r in runs) or 1.0
        self.done = done_cost
        self.n_runs = len(runs)
        self.t0 = time.perf_counter()
        self.cost0 = done_cost
        self.label = ""
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=1000, initial=int(1000 * done_cost / self.total), file=sys.stderr,
                             dynamic_ncols=True, mininterval=1.0, bar_format="{desc} |{bar}| {percentage:3.0f}%")

    def run_started(self, index: int, run: PlannedRun, state: str) -> None:
        self.label = f"study: run {index + 1}/{self.n_runs} {run.name} ({state})"
        self._advance(0.0)

    def step(self, run: PlannedRun) -> None:
        self._advance(run.cost / run.steps)

    def eta_seconds(self) -> float:
        spent = time.perf_counter() - self.t0
        rate = (self.done - self.cost0) / spent if spent > 0 else 0.0
        return max(self.total - self.done, 0.0) / rate if rate > 0 else math.nan

    def _advance(self, cost: float) -> None:
        self.done += cost
        if self._bar is None:
            return
        eta = self.eta_seconds()
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if math.isfinite(eta) else "?"
        self._bar.set_description_str(f"{self.label} ETA {eta_text}", refresh=False)
        target = min(1000, int(1000 * self.done / self.total))
        self._bar.update(target - self._bar.n)  # tqdm throttles the redraws

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class StudyResult:
    out: Path
    runs: list[PlannedRun]
    ran: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def run_dir(out: Path, run: PlannedRun) -> Path:
    return out / "runs" / run.name


def run_study(cfg: StudyConfig, out: str | Path, *, shard: tuple[int, int] = (0, 1), force: bool = False,
              progress: bool = True, log: Callable[[str], None] | None = print,
              draw_mix: DrawMixFigures | None = None, draw_nexus: DrawNexusFigures | None = None) -> StudyResult:
    """Run (or continue) the grid into ``out``; ``shard=(i, n)`` runs only every n-th run
    starting at i (to spread a study over machines sharing ``out``). ``draw_mix`` and
    ``draw_nexus`` draw the data-mix and Nexus parts' figures (none without them)."""
    import torch.distributed as dist

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"'{out}' exists and is not a directory; choose another --out")
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise UserError(f"--shard {index}/{count}: need 0 ≤ i < n")
    runs = plan_study(cfg)
    record = _plan_record(cfg, runs)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    own_group = False
    if world > 1 and not dist.is_initialized():  # one process group for the whole grid
        dist.init_process_group(backend="nccl" if cfg.train.device.startswith("cuda") else "gloo")
        own_group = True
    lead = is_lead()
    try:
        _check_plan(out, record, force)
        if lead:
            atomic_write_text(out / PLAN_FILE, json.dumps(record, indent=2) + "\n")
        mine = [r for i, r in enumerate(runs) if i % count == index]
        result = StudyResult(out=out, runs=runs)
        states = {r.name: run_state(run_dir(out, r), r.steps) for r in mine}
        if force:  # a run trained with other settings starts over (the loop below clears its folder)
            for r in mine:
                if states[r.name] != "fresh" and stored_train_settings(run_dir(out, r)) != to_dict(r.config):
                    states[r.name] = "fresh"
        done_cost = sum(r.cost for r in mine if states[r.name] == "done")
        bar = _GridProgress(mine, done_cost, enabled=progress and lead)
        try:
            for i, r in enumerate(mine):
                state = states[r.name]
                path = run_dir(out, r)
                if state == "done":
                    result.skipped.append(r.name)
                    continue
                bar.run_started(i, r, "resuming" if state == "partial" else "new")
                t0 = time.perf_counter()
                train_from_state(r.config, path, state, on_step=lambda done, total, r=r: bar.step(r))
                result.seconds[r.name] = time.perf_counter() - t0
                (result.resumed if state == "partial" else result.ran).append(r.name)
        finally:
            bar.close()
        if index == 0:  # the extra parts run once, with the first shard
            if cfg.mix.enabled:
                run_mix_study(cfg.mix, out, cfg.train, log=log, draw=draw_mix)
            if cfg.nexus.enabled:
                run_nexus_study(cfg.nexus, out, cfg.train, log=log, draw=draw_nexus)
    finally:
        if own_group:
            import gc

            gc.collect()
            dist.destroy_process_group()
    return result
