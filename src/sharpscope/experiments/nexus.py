"""AdamW against Nexus at matched pretraining loss: the measured study's Nexus diagnostics.

The claim behind Nexus (SPEC §4): plain pretraining reaches a given loss at points where the
minima of the individual sources lie far apart; Nexus reaches the same loss with them closer
together. This module trains one AdamW run and one Nexus run of the same model on the same
sources and token budget (Nexus reads batch_size/K sequences per inner step, so an outer
step reads as many tokens as an AdamW step), into ``STUDY/nexus/adamw`` and
``STUDY/nexus/nexus``, with a checkpoint kept at every evaluation. Then:

* **Matched loss.** target = the larger of the two runs' final validation losses
  (``eval/loss``, the mean over sources of the per-source validation losses). From each run
  the checkpoint used is the *earliest* evaluated checkpoint whose ``eval/loss`` ≤ target.
  The run that ends worse contributes its final checkpoint (or an earlier one that was
  already as good); the better run contributes the first point where it had reached that
  loss. The two losses then differ by at most one evaluation interval's progress; both are
  recorded.
* **Minima distance** (:func:`sharpscope.experiments.minima.minima_distance`) from both
  checkpoints with the same fine-tune settings.
* **Gradient agreement over training**: the ``grad_cosine/*`` rows both runs logged at
  every evaluation (cosine between per-source gradients on the validation batches).

Written: ``STUDY/nexus/nexus.json`` (atomically) and ``STUDY/nexus/figures/*.png`` (by the
``draw`` the caller hands in). Runs are resumable like the study's (finished runs are
skipped, partial ones resumed from their last checkpoint); when both runs were already
finished and ``nexus.json`` holds the same settings, the stored result is reused and only
missing figures are redrawn.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..analysis.nexus import MEAN, grad_cosine_series, window_means
from ..config import to_dict
from ..errors import UserError
from ..runs import CONFIG_FILE, atomic_write_text, json_safe, read_run
from ..training.checkpoint import list_checkpoints
from ..training.config import TrainConfig
from ..training.model import PRESETS
from .minima import minima_distance
from .plan import is_lead, parse_shape, run_state, stored_train_settings, train_from_state
from ..metrics import EVAL_LOSS, EVAL_PREFIX, INNER_COSINE

__all__ = ["NexusStudyConfig", "NexusStudyResult", "plan_nexus_runs", "run_nexus_study", "MATCHED_LOSS_RULE",
           "NEXUS_DIR", "NEXUS_FILE", "COMPARED_OPTIMIZERS", "DrawFigures"]

NEXUS_DIR = "nexus"
NEXUS_FILE = "nexus.json"
COMPARED_OPTIMIZERS = ("adamw", "nexus")  # the study's pair (the names a run can use: OPTIMIZER_REGISTRY)
MATCHED_LOSS_RULE = ("target = the larger of the two runs' final validation losses (eval/loss, the mean over "
                     "sources); each run contributes its earliest evaluated checkpoint whose eval/loss is <= target")
DrawFigures = Callable[..., dict[str, Path]]
"""``draw(record, nexus_dir, only_missing=False)`` draws the record's figures into
nexus_dir/figures and returns their paths by name (experiments sit below report, so the
caller hands in ``sharpscope.report.nexus_figures.write_nexus_figures``)."""


@dataclass
class NexusStudyConfig:
    enabled: bool = False
    """Train the AdamW/Nexus pair and write the diagnostics (STUDY/nexus)."""
    size: str = "2x64"
    """Model of both runs: a preset name or a LAYERSxWIDTH / LAYERSxHEADSxWIDTH shape."""
    steps: int = 1000
    """Optimizer steps of each run (the same token budget for both)."""
    sources: list[str] = field(default_factory=lambda: ["code", "prose", "arithmetic"])
    """Data sources of both runs, fine-tuned on one at a time (at least two)."""
    inner_steps: int = 4
    """Nexus: K inner steps per outer step (must divide the batch size)."""
    inner_lr: float = 0.01
    """Nexus: inner step length γ."""
    source_order: str = "cycle"
    """Nexus: source of each inner micro-batch: cycle, random or mixed."""
    eval_points: int = 20
    """Evaluations per run besides the one at the start; a checkpoint is kept at each, so
    a checkpoint at the matched loss can be picked (the resolution of the matching)."""
    monitor_points: int = 0
    """Critical-sharpness measurements per run (0 = monitor off)."""
    warmup_fraction: float = 0.05
    """Warmup as a fraction of the steps."""
    finetune_steps: int = 100
    """Steps of each per-source fine-tune (fresh AdamW, constant lr)."""
    finetune_lr: float = 3e-4
    """Learning rate of the fine-tunes (constant; the default is the runs' final lr with
    the default schedule: peak 3e-3 × min_ratio 0.1)."""
    finetune_batch_size: int = 0
    """Sequences per fine-tune batch (0 = the runs' batch size)."""
    finetune_weight_decay: float = 0.0
    """Weight decay of the fine-tunes (0: decay would pull every fine-tune toward 0 alike)."""
    segment_points: int = 11
    """Points τ evenly spaced in [0, 1] on each segment between two fine-tuned models."""
    seed: int = 0
    """Seed of both runs (initialisation, data order) and of the fine-tunes' batches."""


@dataclass
class NexusStudyResult:
    out: Path
    """STUDY/nexus."""
    record: dict[str, Any]
    """The content of nexus.json (empty on ranks other than 0)."""
    ran: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    reused: bool = False
    """The diagnostics were read back from nexus.json, not recomputed."""


def _check(cfg: NexusStudyConfig) -> None:
    if len(set(cfg.sources)) < 2 or len(set(cfg.sources)) != len(cfg.sources):
        raise UserError(f"nexus.sources {cfg.sources}: give at least two distinct sources (the diagnostics compare them)")
    checks = [("steps", cfg.steps, 1), ("eval_points", cfg.eval_points, 1), ("finetune_steps", cfg.finetune_steps, 1),
              ("segment_points", cfg.segment_points, 2), ("inner_steps", cfg.inner_steps, 1),
              ("monitor_points", cfg.monitor_points, 0), ("finetune_batch_size", cfg.finetune_batch_size, 0)]
    for name, value, low in checks:
        if value < low:
            raise UserError(f"nexus.{name} must be at least {low}, got {value}")
    if not (cfg.finetune_lr > 0 and math.isfinite(cfg.finetune_lr)):
        raise UserError(f"nexus.finetune_lr must be a finite number > 0, got {cfg.finetune_lr}")
    if not 0 <= cfg.warmup_fraction < 1:
        raise UserError(f"nexus.warmup_fraction must be in [0, 1), got {cfg.warmup_fraction}")


def plan_nexus_runs(cfg: NexusStudyConfig, train_defaults: TrainConfig) -> dict[str, TrainConfig]:
    """The two runs' resolved configs, ``{"adamw": ..., "nexus": ...}``: identical except
    for the optimizer's name. Cadences: evaluation and checkpoint every steps/eval_points
    steps (all checkpoints kept), the monitor every steps/monitor_points."""
    _check(cfg)
    layers, heads, width = parse_shape(cfg.size)
    every = max(1, cfg.steps // cfg.eval_points)
    weights = list(train_defaults.data.weights) if len(train_defaults.data.weights) == len(cfg.sources) else []
    base = dataclasses.replace(
        train_defaults, group="nexus", groups=[], seed=cfg.seed, steps=cfg.steps, progress=False,
        model=dataclasses.replace(train_defaults.model, preset=cfg.size if cfg.size in PRESETS else
                                  train_defaults.model.preset, n_layer=layers, n_head=heads, d_model=width),
        data=dataclasses.replace(train_defaults.data, sources=list(cfg.sources), weights=weights),
        schedule=dataclasses.replace(train_defaults.schedule, warmup_steps=int(round(cfg.warmup_fraction * cfg.steps))),
        monitor=dataclasses.replace(train_defaults.monitor, exact_every=0,
                                    every=max(1, cfg.steps // cfg.monitor_points) if cfg.monitor_points else 0),
        eval=dataclasses.replace(train_defaults.eval, every=every, gradient_agreement=True),
        checkpoint=dataclasses.replace(train_defaults.checkpoint, every=every, keep=cfg.steps // every + 1))
    plans = {}
    for name in COMPARED_OPTIMIZERS:
        optim = dataclasses.replace(base.optim, name=name, inner_steps=cfg.inner_steps, inner_lr=cfg.inner_lr,
                                    source_order=cfg.source_order)
        plans[name] = dataclasses.replace(base, name=f"nexus-study-{name}", optim=optim)
    return plans


def _check_same_settings(path: Path, config: TrainConfig) -> None:
    """Refuse to continue or reuse a run trained with other settings (it would not compare)."""
    file = path / CONFIG_FILE
    if not file.is_file():
        return
    stored = stored_train_settings(path)
    if stored is None:
        raise UserError(f"{file} is not the config of a training run; delete '{path}' to train it afresh")
    wanted = to_dict(config)
    if stored != wanted:
        changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        raise UserError(f"'{path}' holds a run trained with other settings (differs in: {', '.join(changed)}); "
                        "delete it (or the whole nexus folder) to train it afresh with these settings")


def _pick_checkpoint(run_path: Path, rows: list[dict[str, Any]], target: float) -> tuple[Path, dict[str, Any]]:
    """The earliest evaluated checkpoint whose eval/loss ≤ target, and its eval row."""
    kept = {int(p.name.removeprefix("step")): p for p in list_checkpoints(run_path)}
    for row in sorted((r for r in rows if r.get(EVAL_LOSS) is not None), key=lambda r: r["step"]):
        if row["step"] in kept and row[EVAL_LOSS] <= target:
            return kept[row["step"]], row
    raise UserError(f"'{run_path}' has no checkpoint at an evaluation with eval/loss <= {target:.6g}; "
                    "its checkpoints are incomplete: delete the run to train it again")


def _run_record(name: str, run_path: Path, nexus_dir: Path, config: TrainConfig, target: float) -> dict[str, Any]:
    run = read_run(run_path)
    rows = run.metrics
    checkpoint, row = _pick_checkpoint(run_path, rows, target)
    cosine = grad_cosine_series(rows, config.steps)
    early, late = window_means(cosine, MEAN)
    at = row.get("grad_cosine/mean")
    eval_rows = [r for r in rows if EVAL_LOSS in r]
    record = {
        "optimizer": name, "run": run_path.relative_to(nexus_dir).as_posix(), "steps": config.steps,
        "n_params": run.config.get("n_params"),
        "final_loss": eval_rows[-1][EVAL_LOSS],
        "checkpoint": checkpoint.relative_to(nexus_dir).as_posix(), "checkpoint_step": int(row["step"]),
        "checkpoint_t": row["step"] / config.steps, "checkpoint_loss": row[EVAL_LOSS],
        "checkpoint_source_losses": {k.split("/")[1]: v for k, v in row.items()
                                     if k.startswith(EVAL_PREFIX) and k.endswith("/loss") and k != EVAL_LOSS},
        "eval_loss": {"step": [int(r["step"]) for r in eval_rows], "loss": [r[EVAL_LOSS] for r in eval_rows]},
        "grad_cosine": cosine, "grad_cosine_early": early, "grad_cosine_late": late,
        "grad_cosine_at_checkpoint": at if at is not None else math.nan,
    }
    if name == "nexus":
        inner = [r for r in rows if r.get(INNER_COSINE) is not None]
        series = {"t": [r["step"] / config.steps for r in inner], "v": [r[INNER_COSINE] for r in inner]}
        record["inner_cosine_early"], record["inner_cosine_late"] = window_means(series, "v")
    return record


def run_nexus_study(cfg: NexusStudyConfig, study_out: Path, train_defaults: TrainConfig, *,
                    log: Callable[[str], None] | None = print, draw: DrawFigures | None = None) -> NexusStudyResult:
    """Train (or continue) the AdamW and Nexus runs into STUDY/nexus and write the
    diagnostics (module docstring). ``train_defaults``: the settings shared with the
    study's runs (data, optimizer hyper-parameters, schedule, eval batches, device); this
    function sets name, group, seed, steps, model shape, sources, optimizer name, Nexus
    settings and cadences itself."""
    plans = plan_nexus_runs(cfg, train_defaults)
    nexus_dir = Path(study_out) / NEXUS_DIR
    if nexus_dir.exists() and not nexus_dir.is_dir():
        raise UserError(f"'{nexus_dir}' exists and is not a directory; move it away")
    lead = is_lead()
    result = NexusStudyResult(out=nexus_dir, record={})
    for name, config in plans.items():
        path = nexus_dir / name
        state = run_state(path, config.steps)
        if state != "fresh":  # a fresh folder holds nothing worth keeping whatever its settings
            _check_same_settings(path, config)
        if state == "done":
            result.skipped.append(name)
            continue
        if log is not None and lead:
            log(f"nexus study: {'resuming' if state == 'partial' else 'training'} {name} ({config.steps} steps)")
        train_from_state(config, path, state)
        (result.resumed if state == "partial" else result.ran).append(name)
    if not lead:
        return result

    settings = {"nexus": to_dict(cfg), "train": {name: to_dict(c) for name, c in plans.items()}}
    stored = _stored_record(nexus_dir)
    if (not result.ran and not result.resumed and stored is not None and stored.get("settings") == json_safe(settings)):
        result.record, result.reused = stored, True
        if draw is not None:
            draw(stored, nexus_dir, only_missing=True)
        return result

    finals = {name: _final_loss(nexus_dir / name) for name in plans}
    target = max(finals.values())
    record: dict[str, Any] = {"settings": settings, "rule": MATCHED_LOSS_RULE, "target_loss": target,
                              "final_loss": finals, "runs": {}}
    for name, config in plans.items():
        run = _run_record(name, nexus_dir / name, nexus_dir, config, target)
        if log is not None:
            log(f"nexus study: minima distance of {name} at step {run['checkpoint_step']} "
                f"(eval/loss {run['checkpoint_loss']:.4f}, target {target:.4f})")
        minima = minima_distance(nexus_dir / run["checkpoint"], cfg.sources, steps=cfg.finetune_steps,
                                 lr=cfg.finetune_lr, batch_size=cfg.finetune_batch_size or None,
                                 segment_points=cfg.segment_points, seed=cfg.seed,
                                 weight_decay=cfg.finetune_weight_decay, device=config.device)
        run["minima"] = minima.as_dict()
        run["minima"]["checkpoint"] = run["checkpoint"]  # relative, like every path in the record
        record["runs"][name] = run
    record["summary"] = {name: {
        "checkpoint_step": r["checkpoint_step"], "checkpoint_loss": r["checkpoint_loss"],
        "mean_relative_distance": r["minima"]["mean_relative_distance"], "mean_barrier": r["minima"]["mean_barrier"],
        "mean_barrier_linear": r["minima"]["mean_barrier_linear"],
        "grad_cosine_early": r["grad_cosine_early"], "grad_cosine_late": r["grad_cosine_late"],
        "grad_cosine_at_checkpoint": r["grad_cosine_at_checkpoint"]} for name, r in record["runs"].items()}
    record = json_safe(record)
    record["figures"] = {name: path.relative_to(nexus_dir).as_posix()
                         for name, path in (draw(record, nexus_dir) if draw is not None else {}).items()}
    atomic_write_text(nexus_dir / NEXUS_FILE, json.dumps(record, indent=2, allow_nan=False) + "\n")
    result.record = record
    return result


def _stored_record(nexus_dir: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((nexus_dir / NEXUS_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and "runs" in record else None


def _final_loss(run_path: Path) -> float:
    losses = [r[EVAL_LOSS] for r in read_run(run_path).metrics if r.get(EVAL_LOSS) is not None]
    if not losses:
        raise UserError(f"'{run_path}' logged no finite eval/loss; delete it to train it again")
    return float(losses[-1])
