"""The simulated study: every run of SPEC section 5, written in the shared run format.

Layout under the output directory (one run per directory):

    scales/<N>/                    the six scales (seed stream: default_rng(seed), in order)
    schedules/<N>-<schedule>/      5 schedules x 3 scales
    ablations/<N>-<factor>-<level>/ decay multiplier, peak offset, noise: 6 levels x 3 scales
    extrapolation/<N>/             13B, 30B, 70B, to check the extrapolated fits against

Only the scale runs draw from ``default_rng(seed)`` itself, so the published table depends on
nothing else; every other run has its own stream ``default_rng([seed, group, index])``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import to_dict
from ..errors import UserError
from ..runs import write_run
from ..schedules import SCHEDULES
from ..sizes import parse_size
from .config import SimulationConfig
from .trajectories import SimulatedRun, simulate_run
from ..metrics import ACC_PREFIX, CRITICAL, ETA_C, LAMBDA_MAX, TRACE_PER_PARAM, TRAIN_GRAD_NORM, TRAIN_LOSS

GROUPS = ("scales", "schedules", "ablations", "extrapolation")
ABLATION_FACTORS = ("decay_multiplier", "peak_offset", "noise_sigma")


@dataclass
class PlannedRun:
    relpath: str
    config: dict[str, Any]
    run: SimulatedRun

    def rows(self) -> list[dict[str, Any]]:
        r = self.run
        eta_c = 2.0 / np.where(r.sharpness > 0, r.sharpness, np.nan)
        rows = []
        for i in range(r.t.size):
            rows.append({
                "step": int(r.step[i]), "t": float(r.t[i]), "tokens": float(r.tokens[i]), "lr": float(r.lr[i]),
                TRAIN_LOSS: float(r.loss[i]), TRAIN_GRAD_NORM: float(r.grad_norm[i]),
                CRITICAL: float(r.sharpness[i]), ETA_C: float(eta_c[i]),
                LAMBDA_MAX: float(r.lambda_max[i]),
                TRACE_PER_PARAM: float(r.trace_per_param[i]),
            })
        rows[-1].update({ACC_PREFIX + task: acc for task, acc in r.accuracy.items()})
        return rows


def validate(cfg: SimulationConfig) -> None:
    if cfg.n_checkpoints < 20:
        raise UserError(f"n_checkpoints must be at least 20, got {cfg.n_checkpoints}")
    if len(cfg.scales) < 3:
        raise UserError(f"the study needs at least 3 scales to fit, got {len(cfg.scales)}")
    acc = cfg.accuracy
    if not (len(acc.tasks) == len(acc.base) == len(acc.slope)):
        raise UserError("accuracy.tasks, accuracy.base and accuracy.slope must have the same length")
    for name in cfg.schedule_study.schedules:
        if name not in SCHEDULES:
            raise UserError(f"unknown schedule '{name}' in schedule_study.schedules; choose from {', '.join(SCHEDULES)}")
    if cfg.noise_sigma < 0:
        raise UserError("noise_sigma must be non-negative")


def _base_config(cfg: SimulationConfig, label: str, group: str, **extra: Any) -> dict[str, Any]:
    n = parse_size(label)
    return {"name": extra.pop("name", label), "model": label, "n_params": n, "source": "simulated",
            "group": group, "schedule": extra.pop("schedule", "cosine"), "seed": cfg.seed,
            "tokens_budget": cfg.tokens_per_param * n, "total_steps": cfg.total_steps, **extra}


def plan_study(cfg: SimulationConfig) -> list[PlannedRun]:
    """Compute every run of the study in memory (nothing is written)."""
    validate(cfg)
    planned: list[PlannedRun] = []
    rng = np.random.default_rng(cfg.seed)
    for label in cfg.scales:
        run = simulate_run(cfg, parse_size(label), rng)
        planned.append(PlannedRun(f"scales/{label}", _base_config(cfg, label, "scales"), run))

    def stream(group: str, index: int) -> np.random.Generator:
        return np.random.default_rng([cfg.seed, GROUPS.index(group), index])

    index = 0
    for label in cfg.schedule_study.scales:
        for schedule in cfg.schedule_study.schedules:
            run = simulate_run(cfg, parse_size(label), stream("schedules", index), schedule=schedule)
            conf = _base_config(cfg, label, "schedules", name=f"{label}-{schedule}", schedule=schedule)
            planned.append(PlannedRun(f"schedules/{label}-{schedule}", conf, run))
            index += 1

    ab = cfg.ablations
    levels = {"decay_multiplier": ab.decay_multipliers, "peak_offset": ab.peak_offsets, "noise_sigma": ab.noise_sigmas}
    index = 0
    for label in ab.scales:
        for factor in ABLATION_FACTORS:
            for level in levels[factor]:
                kwargs = {factor: float(level)}
                run = simulate_run(cfg, parse_size(label), stream("ablations", index), **kwargs)
                name = f"{label}-{factor}-{level:g}"
                conf = _base_config(cfg, label, "ablations", name=name,
                                    ablation={"factor": factor, "level": float(level)})
                planned.append(PlannedRun(f"ablations/{name}", conf, run))
                index += 1

    for index, label in enumerate(cfg.extrapolation_scales):
        run = simulate_run(cfg, parse_size(label), stream("extrapolation", index))
        planned.append(PlannedRun(f"extrapolation/{label}", _base_config(cfg, label, "extrapolation"), run))

    resolved = to_dict(cfg)
    for p in planned:
        p.config["shape"] = {"peak": p.run.params.peak, "final": p.run.params.final,
                             "t_peak": p.run.params.t_peak, "decay": p.run.params.decay}
        p.config["simulation"] = resolved
    return planned


def write_study(cfg: SimulationConfig, out: str | Path) -> list[Path]:
    """Simulate the study and write it under ``out``; returns the run directories."""
    out = Path(out)
    planned = plan_study(cfg)
    return [write_run(out / p.relpath, p.config, p.rows()) for p in planned]


def n_trajectories(planned: list[PlannedRun]) -> int:
    """Trajectories computed: per run, critical sharpness, lambda_max, trace, loss, grad norm."""
    return 5 * len(planned)


