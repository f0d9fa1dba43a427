"""The data-mix advisor: which fraction of pretraining data to mix into fine-tuning.

A fine-tuning batch is a mixture: a fraction α of its sequences comes from the
pretraining data, 1 − α from the fine-tuning data. At a trained checkpoint, for each α
on a grid:

* the mixed batch B_α is built from two fixed pools of sequences (one per side, drawn
  once with a fixed seed): the first round(α·B) pretraining rows and the first
  B − round(α·B) fine-tuning rows, so neighbouring α share their sequences;
* d_α is the update direction the run's own optimizer takes on B_α: the gradient of the
  mean loss on B_α, clipped as the run clips, handed to the optimizer restored from the
  checkpoint (AdamW's moments included); the step is taken, differenced,
  d_α = (θ_before − θ_after)/lr, and undone exactly (parameters, grads, optimizer state,
  RNG: bit for bit);
* λ_FT(α) = 2/η_c of the fine-tuning loss along d_α (critical sharpness, on a fixed
  fine-tuning probe batch from the validation split): how sharp the fine-tuning objective
  is along the step that the mixture takes;
* λ_PT(α) = 2/η_c of the pretraining loss along d_α (relative critical sharpness λ_c^{PT→α},
  on a fixed pretraining probe batch): how soon the step leaves the pretraining basin.

At α = 0 the step is pure fine-tuning: it usually raises the pretraining loss at once
(λ_PT large, or "not a descent direction", λ_PT = ∞) while the fine-tuning loss tolerates
large steps. At α = 1 it is the other way round. The α where the two curves cross
(linear interpolation of λ_FT − λ_PT between the bracketing grid points) is the
recommendation: a step there is as stable for the pretraining objective as for the
fine-tuning one.

The advice is then checked: short fine-tunes from the checkpoint at several α (and at the
crossing) with the run's optimizer settings and a constant small lr, measuring on the
validation splits

  retention loss(α) = L_PT(after) − L_PT(before)   (pretraining knowledge given up)
  gain(α)           = L_FT(before) − L_FT(after)   (fine-tuning progress)
  score(α)          = gain(α) − w · retention loss(α)   (w = ``retention_weight``)

and reporting the α of highest score, the Pareto front of (retention loss, gain), and where
the recommendation lies on both.

Outcomes of a line search map onto the curves as: a bracketed η_c gives 2/η_c;
"not_descent" (the loss rises for every step size) gives +∞; "no_increase" (no rise up to
η_max) gives 0; a zero direction gives NaN (left out of the crossing).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..analysis.mix import crossing_summary, curve_value, trade_off
from ..config import to_dict
from ..curvature import CriticalSharpnessResult, DirectionCapture, NonFiniteLossError, critical_sharpness
from ..tensors.objective import Objective
from ..tensors.state import OptimizerStateGuard, StateGuard, trainable_parameters
from ..errors import UserError
from ..runs import atomic_write_text, json_safe
from ..training import data as data_lib
from ..training.checkpoint import list_checkpoints, load_checkpoint, read_state
from ..training.config import TrainConfig
from ..training.checkpoint import checkpoint_config
from ..training.model import PRESETS
from ..training.optimizers import build_optimizer, plain_optimizer
from ..training.trainer import TOKENIZER_FILE, build_model, lm_loss, make_run_tokenizer, run_lr
from .plan import is_lead, parse_shape, run_state, train_from_state, with_current_defaults

__all__ = [
    "MixConfig", "MixStreams", "MixStudyConfig", "check_mix_config", "fine_tune", "mix_direction", "mix_sweep",
    "n_pretrain_rows", "run_mix", "run_mix_study", "validate_mix", "load_for_mix", "checkpoint_lr", "read_result",
    "write_results", "resolve_checkpoint", "mix_base_config", "DrawFigures",
]

RESULT_FILE = "mix.json"
SWEEP_CSV = "mix.csv"
VALIDATION_CSV = "mix_validation.csv"
MIX_DIR = "mix"
BASE_DIR = "base"
METHODS = ("fast", "paper")
MOMENTS = ("checkpoint", "fresh")
DrawFigures = Callable[[Mapping[str, Any], Path], dict[str, Path]]
"""Draws a result's figures into a folder and returns their paths by name (experiments sit
below report, so the caller hands in ``sharpscope.report.mix_figures.write_mix_figures``)."""


@dataclass
class MixConfig:
    alphas: list[float] = field(default_factory=lambda: [round(0.1 * i, 1) for i in range(11)])
    """Pretraining fractions α of the sweep, each in [0, 1]; at least two distinct values
    (sorted, duplicates dropped). α is realised as round(α·batch_size) pretraining rows."""
    batch_size: int = 40
    """Sequences in the mixed batch whose update direction is measured (and in each
    validation fine-tuning step). A multiple of 20 keeps the default α grid and the
    validation α (quarters) exact."""
    probe_batch_size: int = 32
    """Sequences in each fixed probe batch (fine-tuning and pretraining, from the
    validation splits) on which the two critical sharpnesses are measured."""
    probe_batches: int = 1
    """Probe batches per side; the measured loss is their mean."""
    seed: int = 0
    """Seed of the pools of sequences, the probe batches, the validation batches and the
    fine-tuning dropout."""
    method: str = "fast"
    """Line search of the critical sharpness: 'fast' or 'paper'."""
    rtol: float = 0.0625
    """Relative bracket width at which a line search stops (η_c to about ±3%)."""
    moments: str = "checkpoint"
    """Optimizer state the directions and the validation fine-tunes start from:
    'checkpoint' (the run's, AdamW's moments restored: the next step of a run that goes
    on with the new mixture) or 'fresh' (a new optimizer, as a separate fine-tuning run
    with its own optimizer would start)."""
    clip: bool = True
    """Clip the mixed-batch gradient to the run's optim.grad_clip before the optimizer
    sees it, as training does (false: the raw gradient)."""
    validate: bool = True
    """Check the advice with short fine-tunes from the checkpoint."""
    validate_alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """α at which to fine-tune (the crossing is added when ``validate_crossing``)."""
    validate_crossing: bool = True
    """Also fine-tune at the recommended (crossing) α when the curves cross."""
    validate_steps: int = 50
    """Optimizer steps of each validation fine-tune (step k uses the mixed batch k of the
    same pools, so every α sees the same sequences)."""
    validate_lr: float = 3e-4
    """Constant learning rate of the validation fine-tunes (no warmup, no decay); the other
    optimizer settings (betas, weight decay, clipping, moments) are the run's."""
    eval_batches: int = 4
    """Validation batches per source (of batch_size sequences each) for the losses before
    and after each fine-tune."""
    retention_weight: float = 1.0
    """w in the validation criterion score = gain − w·retention loss: nats of fine-tuning
    loss gained that one nat of pretraining loss given up is worth."""


def check_mix_config(cfg: MixConfig) -> list[float]:
    """Validate the settings; returns the sorted distinct α of the sweep."""
    alphas = _alpha_list(cfg.alphas, "alphas")
    if len(alphas) < 2:
        raise UserError(f"the sweep needs at least 2 distinct α values, got {len(alphas)} ({_fmt_list(alphas)}); "
                        "give e.g. --alphas 0,0.25,0.5,0.75,1")
    for name in ("batch_size", "probe_batch_size", "probe_batches", "eval_batches"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"mix setting {name} must be a whole number ≥ 1, got {value!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise UserError(f"mix setting seed must be a non-negative whole number, got {cfg.seed!r}")
    if cfg.method not in METHODS:
        raise UserError(f"mix setting method must be 'fast' or 'paper', got '{cfg.method}'")
    if cfg.moments not in MOMENTS:
        raise UserError(f"mix setting moments must be 'checkpoint' or 'fresh', got '{cfg.moments}'")
    if not (isinstance(cfg.rtol, (int, float)) and 0 < cfg.rtol < 1):
        raise UserError(f"mix setting rtol must lie in (0, 1), got {cfg.rtol!r}")
    if cfg.validate:
        validate = _alpha_list(cfg.validate_alphas, "validate_alphas")
        if not validate:
            raise UserError("validate_alphas is empty; give the α to fine-tune at, or pass --no-validate")
        if isinstance(cfg.validate_steps, bool) or not isinstance(cfg.validate_steps, int) or cfg.validate_steps < 1:
            raise UserError(f"validate_steps must be a whole number ≥ 1, got {cfg.validate_steps!r}")
        if not (math.isfinite(cfg.validate_lr) and cfg.validate_lr > 0):
            raise UserError(f"validate_lr must be a positive number, got {cfg.validate_lr!r}")
        if not (math.isfinite(cfg.retention_weight) and cfg.retention_weight >= 0):
            raise UserError(f"retention_weight must be a number ≥ 0, got {cfg.retention_weight!r}")
    return alphas


def _fmt_list(values: Sequence[float]) -> str:
    return ",".join(f"{v:g}" for v in values) or "none"


def _alpha_list(values: Sequence[float], what: str) -> list[float]:
    out = []
    for a in values:
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or not 0.0 <= a <= 1.0:
            raise UserError(f"{what}: α = {a!r} is outside [0, 1]; α is the pretraining fraction of the batch")
        out.append(float(a))
    return sorted(set(out))


def n_pretrain_rows(alpha: float, batch_size: int) -> int:
    """Pretraining rows of a mixed batch: round(α·B), halves rounded up."""
    return min(batch_size, max(0, int(math.floor(alpha * batch_size + 0.5))))


# --------------------------------------------------------------------------- data


class MixStreams:
    """The fixed data of a mix analysis.

    Batch ``k`` of each side is a pure function of (seed, k): the pretraining side is the
    equal mixture of the pretraining sources (``BatchSampler``, seed ``seed``), the
    fine-tuning side the fine-tuning source (seed ``seed + 1``), both from the training
    splits. The mixed batch of α at index k stacks the first round(α·B) pretraining rows
    and the first B − round(α·B) fine-tuning rows of batch k. Probe batches come from the
    validation splits (seeds ``seed + 2`` and ``seed + 3``); the validation-loss batches
    are :func:`~sharpscope.training.data.validation_batches` with ``seed``.
    """

    def __init__(self, pretrain: Mapping[str, data_lib.TokenSource], finetune: data_lib.TokenSource, *,
                 batch_size: int, block_size: int, probe_batch_size: int = 32, probe_batches: int = 1,
                 eval_batches: int = 4, seed: int = 0):
        if finetune.name in pretrain:
            raise UserError(f"the fine-tuning source '{finetune.name}' is also a pretraining source; "
                            "give two different sources (rename one with name:spec)")
        self.pretrain_sources = dict(pretrain)
        self.finetune_source = finetune
        self.batch_size = batch_size
        self.block_size = block_size
        ft = {finetune.name: finetune}
        self._pretrain = data_lib.BatchSampler(pretrain, batch_size=batch_size, block_size=block_size,
                                               seed=seed, split="train")
        self._finetune = data_lib.BatchSampler(ft, batch_size=batch_size, block_size=block_size,
                                               seed=seed + 1, split="train")
        pt_probe = data_lib.BatchSampler(pretrain, batch_size=probe_batch_size, block_size=block_size,
                                         seed=seed + 2, split="val")
        ft_probe = data_lib.BatchSampler(ft, batch_size=probe_batch_size, block_size=block_size,
                                         seed=seed + 3, split="val")
        self.pretrain_probe = [pt_probe.batch_at(k) for k in range(probe_batches)]
        self.finetune_probe = [ft_probe.batch_at(k) for k in range(probe_batches)]
        val = data_lib.validation_batches({**pretrain, **ft}, batch_size=batch_size, block_size=block_size,
                                          n_batches=eval_batches, seed=seed)
        self.pretrain_val = {name: val[name] for name in pretrain}
        self.finetune_val = val[finetune.name]

    @property
    def finetune_name(self) -> str:
        return self.finetune_source.name

    def mixed_batch(self, alpha: float, k: int = 0) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
        """(the mixed batch (x_BxT, y_BxT) of α at index k, its number of pretraining rows)."""
        n = n_pretrain_rows(alpha, self.batch_size)
        pt_x, pt_y = self._pretrain.batch_at(k)
        ft_x, ft_y = self._finetune.batch_at(k)
        m = self.batch_size - n
        x_BxT = torch.cat([pt_x[:n], ft_x[:m]])
        y_BxT = torch.cat([pt_y[:n], ft_y[:m]])
        return (x_BxT, y_BxT), n


# --------------------------------------------------------------------------- the sweep


def mix_direction(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Any, *, lr: float,
                  grad_clip: float = 0.0, loss_fn: Callable = lm_loss) -> list[torch.Tensor]:
    """The direction d of the optimizer's next step on ``batch`` (a step is θ − lr·d).

    The gradient of the mean loss (eval mode) is clipped to ``grad_clip`` (0 = no
    clipping) by ``clip_grad_norm_`` as the trainer does, put into ``.grad``, and
    ``optimizer.step()`` is taken with every group's lr set to ``lr``, differenced by
    :class:`DirectionCapture` and undone: parameters, buffers, ``.grad``, modes, RNG and
    the optimizer's state and groups are exactly as before.
    """
    params = trainable_parameters(model)
    objective = Objective(model, loss_fn, batch, distributed=False)
    with StateGuard(model, mode="eval"):
        grads = objective.gradient(params)
        for p, g in zip(params, grads):
            p.grad = g
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        with OptimizerStateGuard(optimizer):
            for group in optimizer.param_groups:
                group["lr"] = lr
            with DirectionCapture(params, optimizer=optimizer) as capture:
                optimizer.step()
    return capture.direction


def _search(model, probe, direction, *, lr, method, rtol, warm: CriticalSharpnessResult | None,
            loss_fn, what: str) -> CriticalSharpnessResult:
    eta0 = warm.eta if warm is not None and math.isfinite(warm.eta) and warm.eta > 0 else lr
    try:
        return critical_sharpness(model, loss_fn, probe, direction, method=method, rtol=rtol, eta0=eta0,
                                  warm_start=warm, distributed=False)
    except NonFiniteLossError:
        raise UserError(f"the checkpoint's loss on the {what} probe batch is not finite; "
                        "the model cannot be measured there") from None


def mix_sweep(model: torch.nn.Module, optimizer: torch.optim.Optimizer, streams: MixStreams,
              alphas: Sequence[float], *, lr: float, grad_clip: float = 0.0, method: str = "fast",
              rtol: float = 1 / 16, loss_fn: Callable = lm_loss,
              log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """One row per α (ascending): the two critical sharpnesses along d_α.

    ``optimizer`` takes the steps (for the SAM family and Nexus pass their base, see
    :func:`~sharpscope.training.optimizers.plain_optimizer`). Each search starts at η0 = the
    previous α's η_c on the same curve (``lr`` for the first α) and is warm-started from
    it. Model, optimizer and RNG states are left exactly as they were.

    Row keys: ``alpha``, ``alpha_effective`` (= n_pretrain / batch_size), ``n_pretrain``,
    ``n_finetune``, ``direction_norm``; for the fine-tuning loss ``lambda_finetune``
    (:func:`curve_value`), ``eta_finetune``, ``status_finetune``, ``evals_finetune``,
    ``loss_finetune`` (its probe loss at θ); the same with ``pretrain`` for the
    pretraining loss (the relative critical sharpness).
    """
    rows = []
    warm_ft = warm_pt = None
    for alpha in sorted(float(a) for a in alphas):
        batch, n = streams.mixed_batch(alpha, 0)
        d = mix_direction(model, optimizer, batch, lr=lr, grad_clip=grad_clip, loss_fn=loss_fn)
        ft = _search(model, streams.finetune_probe, d, lr=lr, method=method, rtol=rtol, warm=warm_ft,
                     loss_fn=loss_fn, what="fine-tuning")
        pt = _search(model, streams.pretrain_probe, d, lr=lr, method=method, rtol=rtol, warm=warm_pt,
                     loss_fn=loss_fn, what="pretraining")
        warm_ft = ft if ft.ok else warm_ft
        warm_pt = pt if pt.ok else warm_pt
        row = {"alpha": alpha, "alpha_effective": n / streams.batch_size, "n_pretrain": n,
               "n_finetune": streams.batch_size - n,
               "direction_norm": math.sqrt(sum(float(t.double().pow(2).sum()) for t in d))}
        for key, r in (("finetune", ft), ("pretrain", pt)):
            row.update({f"lambda_{key}": curve_value(r.sharpness, r.status), f"eta_{key}": r.eta,
                        f"status_{key}": r.status, f"evals_{key}": r.evals, f"loss_{key}": r.loss0})
        rows.append(row)
        if log is not None:
            log(f"[mix] α={alpha:.3g}: λ_c fine-tuning {_show(row['lambda_finetune'])} ({ft.status}), "
                f"relative λ_c pretraining {_show(row['lambda_pretrain'])} ({pt.status})")
    return rows


def _show(value: float | None) -> str:
    if value is None:
        return "nan"
    if math.isinf(value):
        return "inf"
    return f"{value:.4g}"


# --------------------------------------------------------------------------- validation


def _eval_losses(model: torch.nn.Module, streams: MixStreams, loss_fn: Callable) -> dict[str, float]:
    """Mean validation loss per source, the pretraining mean over its sources, and the
    fine-tuning loss (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        with torch.no_grad():
            per_source = {}
            for name, batches in [*streams.pretrain_val.items(), (streams.finetune_name, streams.finetune_val)]:
                per_source[name] = sum(float(loss_fn(model, b)) for b in batches) / len(batches)
    finally:
        model.train(was_training)
    pretrain = [per_source[n] for n in streams.pretrain_val]
    out["pretrain"] = sum(pretrain) / len(pretrain)
    out["finetune"] = per_source[streams.finetune_name]
    out.update({f"source/{k}": v for k, v in per_source.items()})
    return out


def fine_tune(model: torch.nn.Module, optimizer: torch.optim.Optimizer, streams: MixStreams, alpha: float, *,
              steps: int, lr: float, grad_clip: float = 0.0, seed: int = 0,
              loss_fn: Callable = lm_loss) -> dict[str, Any]:
    """``steps`` optimizer steps on the mixed batches 0, 1, ... of α at a constant ``lr``
    (train mode, dropout seeded by ``seed``; the caller's RNG state is kept). Stops at a
    non-finite loss. Returns ``status`` ("ok" or "diverged"), ``steps`` done and the mean
    training loss of the last quarter of the steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    losses = []
    status = "ok"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr
        for k in range(steps):
            batch, _ = streams.mixed_batch(alpha, k)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                status = "diverged"
                break
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            losses.append(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    tail = losses[-max(1, len(losses) // 4):] if losses else []
    return {"status": status, "steps": len(losses), "train_loss": sum(tail) / len(tail) if tail else math.nan}


def validate_mix(load: Callable[[], tuple[torch.nn.Module, torch.optim.Optimizer]], streams: MixStreams,
                 alphas: Sequence[float], *, recommended: float | None = None, steps: int, lr: float,
                 grad_clip: float = 0.0, seed: int = 0, retention_weight: float = 1.0,
                 loss_fn: Callable = lm_loss, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Short fine-tunes from the checkpoint at each α (plus ``recommended``), each from a
    fresh ``load()`` = (model, optimizer) at the checkpoint. Returns ``rows`` (per α: the
    validation losses before and after, ``gain``, ``retention_loss``, ``score``,
    ``pareto``, ``rank``, ``recommended``), ``before`` (the losses at the checkpoint) and
    the verdict of :func:`trade_off`."""
    points = sorted({float(a) for a in alphas} | ({float(recommended)} if recommended is not None else set()))
    model, _ = load()
    before = _eval_losses(model, streams, loss_fn)
    del model
    rows = []
    for alpha in points:
        model, optimizer = load()
        t0 = time.perf_counter()
        run = fine_tune(model, optimizer, streams, alpha, steps=steps, lr=lr, grad_clip=grad_clip, seed=seed,
                        loss_fn=loss_fn)
        after = _eval_losses(model, streams, loss_fn) if run["status"] == "ok" else None
        n = n_pretrain_rows(alpha, streams.batch_size)
        row = {"alpha": alpha, "alpha_effective": n / streams.batch_size, "n_pretrain": n,
               "recommended": recommended is not None and alpha == float(recommended),
               "status": run["status"], "steps": run["steps"],
               "pretrain_loss_before": before["pretrain"],
               "pretrain_loss_after": after["pretrain"] if after else math.nan,
               "finetune_loss_before": before["finetune"],
               "finetune_loss_after": after["finetune"] if after else math.nan,
               "train_loss_end": run["train_loss"], "seconds": time.perf_counter() - t0}
        row["retention_loss"] = row["pretrain_loss_after"] - row["pretrain_loss_before"]
        row["gain"] = row["finetune_loss_before"] - row["finetune_loss_after"]
        rows.append(row)
        if log is not None:
            log(f"[mix] fine-tune α={alpha:.3g}: gain {row['gain']:.4f}, retention loss {row['retention_loss']:.4f}"
                f"{' (recommended)' if row['recommended'] else ''}")
    verdict = trade_off(rows, retention_weight)
    return {"rows": rows, "before": before, "steps": steps, "lr": lr, **verdict}


# --------------------------------------------------------------------------- files


SWEEP_COLUMNS = ["alpha", "alpha_effective", "n_pretrain", "n_finetune", "lambda_finetune", "eta_finetune",
                 "status_finetune", "evals_finetune", "loss_finetune", "lambda_pretrain", "eta_pretrain",
                 "status_pretrain", "evals_pretrain", "loss_pretrain", "direction_norm"]
VALIDATION_COLUMNS = ["alpha", "alpha_effective", "n_pretrain", "recommended", "status", "steps",
                      "pretrain_loss_before", "pretrain_loss_after", "retention_loss", "finetune_loss_before",
                      "finetune_loss_after", "gain", "score", "rank", "pareto", "train_loss_end", "seconds"]


def _csv_text(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        out = []
        for c in columns:
            v = row.get(c)
            out.append("" if v is None else (repr(float(v)) if isinstance(v, float) else v))
        writer.writerow(out)
    return buf.getvalue()


def write_results(result: dict[str, Any], out: Path, draw: DrawFigures | None = None) -> dict[str, Path]:
    """Figures (by ``draw``; none without it), CSVs and (last, so that its presence means a
    finished analysis) mix.json, each written atomically. Returns the paths by name."""
    out = Path(out)
    paths = dict(draw(result, out)) if draw is not None else {}
    if result.get("validation"):
        atomic_write_text(out / VALIDATION_CSV, _csv_text(result["validation"]["rows"], VALIDATION_COLUMNS))
        paths["validation_csv"] = out / VALIDATION_CSV
    atomic_write_text(out / SWEEP_CSV, _csv_text(result["sweep"], SWEEP_COLUMNS))
    paths["sweep_csv"] = out / SWEEP_CSV
    atomic_write_text(out / RESULT_FILE, json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
    paths["json"] = out / RESULT_FILE
    return paths


def read_result(out: Path) -> dict[str, Any]:
    """mix.json of an analysis directory, with the curves' infinities restored from the
    statuses (JSON has none)."""
    path = Path(out) / RESULT_FILE
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        for row in result["sweep"]:
            for key in ("finetune", "pretrain"):
                row[f"lambda_{key}"] = curve_value(row[f"lambda_{key}"], row[f"status_{key}"])
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{path} is missing or not a data-mix result; run sharpscope mix again") from None
    return result


# --------------------------------------------------------------------------- from a checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoints/stepNNNNNNNN folder as given, or the latest one of a run directory."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint '{path}' not found; give a RUN/checkpoints/stepNNNNNNNN folder or a run folder")
    if (path / "train_state.json").is_file():
        return path
    found = list_checkpoints(path) if path.is_dir() else []
    if not found:
        raise UserError(f"'{path}' is neither a checkpoint (no train_state.json) nor a run with checkpoints; "
                        "give a RUN/checkpoints/stepNNNNNNNN folder")
    return found[-1]


def _run_tokenizer(config: TrainConfig, run_dir: Path):
    if config.data.tokenizer != "bytes" and not (run_dir / TOKENIZER_FILE).is_file():
        raise UserError(f"{run_dir / TOKENIZER_FILE} is missing; the run's tokenizer is needed to tokenize the sources")
    return make_run_tokenizer(config, run_dir, save=False)


def load_for_mix(checkpoint: Path, config: TrainConfig, vocab_size: int):
    """(model, the run's optimizer, train state) restored from ``checkpoint``: weights and
    optimizer state (AdamW's moments) as the run left them. The step direction is taken
    by ``plain_optimizer`` of the optimizer (the base of the SAM family and Nexus)."""
    model = build_model(config.model, vocab_size)
    optimizer = build_optimizer(config.optim, model)
    state = load_checkpoint(checkpoint, model, optimizer)
    return model, optimizer, state


def checkpoint_lr(config: TrainConfig, step: int, state: dict | None = None) -> float:
    """The run's lr of the step after the checkpoint (the last step's lr at the end of a
    run; an automatic warmup's from the checkpoint's ``state``); the peak lr when the
    schedule has reached 0 there."""
    lr = run_lr(config, state or {}, min(step, config.steps - 1))[0]
    return lr if lr > 0 else config.optim.lr


def _split_specs(specs: Sequence[str] | str) -> list[str]:
    if isinstance(specs, str):
        specs = [specs]
    out = [s.strip() for spec in specs for s in str(spec).split(",") if s.strip()]
    if not out:
        raise UserError("no pretraining source given; name at least one (e.g. --pretrain code)")
    return out


def run_mix(checkpoint: str | Path, pretrain: Sequence[str] | str, finetune: str, cfg: MixConfig | None = None,
            out: str | Path = "mix", *, log: Callable[[str], None] | None = None,
            draw: DrawFigures | None = None) -> dict[str, Any]:
    """The whole advisor on a checkpoint: sweep, crossing, validation, files in ``out``
    (the figures drawn by ``draw``, none without it).

    ``pretrain``: one or more source specs (a comma-separated string is split), mixed in
    equal parts; ``finetune``: one source spec. Every input is checked before anything is
    written. Returns the result dict (what mix.json holds, with infinities kept) plus
    ``paths``.
    """
    cfg = cfg or MixConfig()
    t_start = time.perf_counter()
    alphas = check_mix_config(cfg)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"'{out}' exists and is not a directory; choose another --out")
    pretrain_specs = _split_specs(pretrain)
    if not isinstance(finetune, str) or not finetune.strip():
        raise UserError("no fine-tuning source given; name one (e.g. --finetune arithmetic)")
    if "," in finetune:
        raise UserError(f"--finetune takes one source, got '{finetune}'")
    checkpoint = resolve_checkpoint(checkpoint)
    state = read_state(checkpoint)  # checksums first: a corrupt checkpoint is named before anything loads
    config = checkpoint_config(checkpoint)
    run_dir = checkpoint.parent.parent
    tokenizer = _run_tokenizer(config, run_dir)
    block = config.model.block_size
    common = dict(tokenizer=tokenizer, val_fraction=config.data.val_fraction, max_bytes=config.data.max_bytes,
                  seed=config.seed, block_size=block + 1)
    pt_sources = data_lib.load_sources(pretrain_specs, **common)
    ft_source = data_lib.load_source(finetune.strip(), **common)
    data_lib.check_vocab({**pt_sources, ft_source.name: ft_source}, tokenizer.vocab_size)
    streams = MixStreams(pt_sources, ft_source, batch_size=cfg.batch_size, block_size=block,
                         probe_batch_size=cfg.probe_batch_size, probe_batches=cfg.probe_batches,
                         eval_batches=cfg.eval_batches, seed=cfg.seed)

    model, wrapper, state = load_for_mix(checkpoint, config, tokenizer.vocab_size)
    fresh = cfg.moments == "fresh"
    if fresh:
        wrapper = build_optimizer(config.optim, model)
    optimizer = plain_optimizer(wrapper)
    step = int(state["step"])
    lr = checkpoint_lr(config, step, state)
    grad_clip = config.optim.grad_clip if cfg.clip else 0.0
    model_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer_state = copy.deepcopy(wrapper.state_dict())

    t0 = time.perf_counter()
    sweep = mix_sweep(model, optimizer, streams, alphas, lr=lr, grad_clip=grad_clip, method=cfg.method,
                      rtol=cfg.rtol, log=log)
    sweep_seconds = time.perf_counter() - t0
    crossing = crossing_summary(sweep)
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint), "step": step, "run": str(run_dir), "run_name": config.name,
        "optimizer": config.optim.name, "direction_optimizer": type(optimizer).__name__, "moments": cfg.moments,
        "pretrain": list(pt_sources), "pretrain_specs": pretrain_specs, "finetune": ft_source.name,
        "finetune_spec": finetune.strip(), "lr": lr, "two_over_lr": 2.0 / lr, "grad_clip": grad_clip,
        "config": to_dict(cfg), "sweep": sweep, "crossing": crossing,
        "recommended_alpha": crossing["recommended_alpha"], "seconds": {"sweep": sweep_seconds},
        "probes": {"finetune": f"{cfg.probe_batches} × {cfg.probe_batch_size} sequences of {ft_source.name} "
                               f"(validation split, seed {cfg.seed + 3})",
                   "pretrain": f"{cfg.probe_batches} × {cfg.probe_batch_size} sequences of "
                               f"{' + '.join(pt_sources)} (validation split, seed {cfg.seed + 2})"},
    }
    if cfg.validate:
        def load() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
            m = build_model(config.model, tokenizer.vocab_size)
            m.load_state_dict(model_state)
            o = build_optimizer(config.optim, m)
            if not fresh:
                o.load_state_dict(copy.deepcopy(optimizer_state))
            return m, plain_optimizer(o)

        t0 = time.perf_counter()
        recommended = crossing["recommended_alpha"] if cfg.validate_crossing else None
        result["validation"] = validate_mix(
            load, streams, _alpha_list(cfg.validate_alphas, "validate_alphas"), recommended=recommended,
            steps=cfg.validate_steps, lr=cfg.validate_lr, grad_clip=grad_clip, seed=cfg.seed,
            retention_weight=cfg.retention_weight, log=log)
        result["seconds"]["validation"] = time.perf_counter() - t0
    result["seconds"]["total"] = time.perf_counter() - t_start
    result["paths"] = {k: str(v) for k, v in write_results({k: v for k, v in result.items()}, out, draw).items()}
    return result


# --------------------------------------------------------------------------- the measured study


@dataclass
class MixStudyConfig:
    enabled: bool = False
    """Run the data-mix part of the measured study (train the base model, sweep, validate)."""
    pretrain: list[str] = field(default_factory=lambda: ["code", "prose"])
    """Sources the base model is trained on (equal mixture): the "pretraining" data."""
    finetune: str = "arithmetic"
    """The fine-tuning source, new to the base model."""
    size: str = "2x64"
    """Base model shape: a preset name or LAYERSxWIDTH / LAYERSxHEADSxWIDTH (as the study's sizes)."""
    steps: int = 1000
    """Training steps of the base model."""
    seed: int = 0
    """Seed of the base model's training."""
    warmup_fraction: float = 0.05
    """Warmup as a fraction of the base model's steps."""
    monitor_points: int = 50
    """Critical-sharpness measurements during base training (0 = none)."""
    eval_points: int = 10
    """Validation passes during base training."""
    checkpoint_points: int = 4
    """Checkpoints of the base training (resume granularity); only the latest is kept."""
    mix: MixConfig = field(default_factory=MixConfig)
    """The sweep and validation settings."""


def mix_base_config(cfg: MixStudyConfig, train_defaults: TrainConfig) -> TrainConfig:
    """The base model's TrainConfig: the study's shared settings with the pretraining
    sources, the shape, the steps and the cadences of ``cfg``."""
    layers, heads, width = parse_shape(cfg.size)
    if cfg.steps < 1:
        raise UserError(f"mix.steps must be at least 1, got {cfg.steps}")
    if not 0 <= cfg.warmup_fraction < 1:
        raise UserError(f"mix.warmup_fraction must be in [0, 1), got {cfg.warmup_fraction}")

    def every(points: int) -> int:
        return max(1, cfg.steps // points) if points > 0 else 0

    t = train_defaults
    return dataclasses.replace(
        t, name="mix-base", group="mix", groups=[], seed=cfg.seed, steps=cfg.steps, progress=False,
        model=dataclasses.replace(t.model, preset=cfg.size if cfg.size in PRESETS else t.model.preset,
                                  n_layer=layers, n_head=heads, d_model=width),
        data=dataclasses.replace(t.data, sources=list(cfg.pretrain), weights=[]),
        schedule=dataclasses.replace(t.schedule, warmup_steps=int(round(cfg.warmup_fraction * cfg.steps))),
        monitor=dataclasses.replace(t.monitor, every=every(cfg.monitor_points), exact_every=0),
        eval=dataclasses.replace(t.eval, every=every(cfg.eval_points)),
        checkpoint=dataclasses.replace(t.checkpoint, every=every(cfg.checkpoint_points), keep=1))


def _same_analysis(path: Path, cfg: MixStudyConfig, step: int) -> bool:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        stored_cfg = stored["config"]
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return False
    return (with_current_defaults(MixConfig, stored_cfg) == to_dict(cfg.mix) and stored.get("step") == step
            and stored.get("pretrain_specs") == _split_specs(cfg.pretrain)
            and stored.get("finetune_spec") == cfg.finetune)


def run_mix_study(cfg: MixStudyConfig, study_out: Path, train_defaults: TrainConfig, *,
                  log: Callable[[str], None] | None = print, draw: DrawFigures | None = None) -> dict[str, Any] | None:
    """The measured study's data-mix part, resumably, into ``study_out/mix``.

    Trains the base model on ``cfg.pretrain`` into ``study_out/mix/base`` (skipped when it
    has finished, resumed from its latest checkpoint when it has not, started afresh when
    it has no checkpoint), then runs :func:`run_mix` on its final checkpoint with
    ``cfg.finetune`` into ``study_out/mix`` (skipped when mix.json there already holds an
    analysis of that checkpoint with the same settings). Returns the result (None on a
    rank other than 0 under torch.distributed: ranks train together, rank 0 analyses).
    Called by the study driver when ``cfg.enabled``; it does not check the flag itself.
    """
    mix_dir = Path(study_out) / MIX_DIR
    base = mix_dir / BASE_DIR
    check_mix_config(cfg.mix)
    config = mix_base_config(cfg, train_defaults)
    state = run_state(base, config.steps)
    if state != "done":
        if log is not None:
            log(f"[mix] training the base model {cfg.size} on {', '.join(cfg.pretrain)} for {cfg.steps} steps "
                f"({'resuming' if state == 'partial' else 'new'}) -> {base}")
        train_from_state(config, base, state)
    if not is_lead():
        return None
    checkpoint = list_checkpoints(base)[-1]
    step = int(checkpoint.name.removeprefix("step"))
    if _same_analysis(mix_dir / RESULT_FILE, cfg, step):
        if log is not None:
            log(f"[mix] the sweep of {checkpoint} is already in {mix_dir / RESULT_FILE}")
        return read_result(mix_dir)
    result = run_mix(checkpoint, cfg.pretrain, cfg.finetune, cfg.mix, mix_dir, log=log, draw=draw)
    if log is not None:
        log(f"[mix] {result['crossing']['note']} -> {mix_dir / RESULT_FILE}")
    return result
