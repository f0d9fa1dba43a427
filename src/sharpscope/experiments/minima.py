"""Distance between per-source minima: from one checkpoint θ_0, where does each data source
alone pull the model, and how far apart (and how separated by loss) are those places?

For every source s a short fine-tune from θ_0 on batches of s alone gives θ_s. Reported:

* displacement  ‖θ_s − θ_0‖ (and relative, ÷ ‖θ_0‖), and the loss of θ_s on every source;
* distance      ‖θ_a − θ_b‖ (and ÷ ‖θ_0‖) for every pair a < b (sorted names), and the
                cosine between the two displacements, cos(θ_a − θ_0, θ_b − θ_0);
* segment       L_e(θ(τ)) with θ(τ) = (1−τ)·θ_a + τ·θ_b at ``segment_points`` values of τ
                evenly spaced in [0, 1], for every evaluation source e and for their mean;
* barrier       max_τ L(θ(τ)) − (L(θ_a) + L(θ_b))/2 for each of those curves (≤ 0 when no
                point of the line is worse than the two ends on average; > 0 when a ridge
                separates the two fine-tuned points), and ``barrier_linear``,
                max_τ [L(θ(τ)) − ((1−τ)·L(θ_a) + τ·L(θ_b))], the rise above the chord
                (the form to read for a single source's curve, whose ends differ).

Norms run over every distinct trainable parameter (tied weights once), accumulated in
float64. The losses are the run's own validation batches (the ones its ``eval/<source>/loss``
rows were computed on, so the loss of θ_0 here equals those rows at the checkpoint's step),
with dropout off. The checkpoint is only read; nothing is written anywhere.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..analysis.nexus import MEAN  # key of the mean over the evaluation sources in every loss mapping
from ..errors import UserError
from ..training import data as data_lib
from ..training.checkpoint import load_checkpoint, read_state
from ..training.checkpoint import checkpoint_config
from ..training.trainer import TOKENIZER_FILE, build_model, lm_loss, make_run_tokenizer

__all__ = ["MinimaDistance", "minima_distance", "pair_name"]

THETA0 = "theta0"
"""Key of the checkpoint's own parameters in :attr:`MinimaDistance.losses`."""


def pair_name(a: str, b: str) -> str:
    """``a~b`` with the names sorted: the key of a pair (as ``grad_cosine/a~b``)."""
    a, b = sorted((a, b))
    return f"{a}~{b}"


@dataclass
class MinimaDistance:
    """What :func:`minima_distance` measured. Loss mappings are ``{eval source: loss, "mean": ...}``."""

    checkpoint: str
    step: int
    sources: list[str]
    """Sources fine-tuned on (each gives one θ_s)."""
    eval_sources: list[str]
    """Sources whose validation batches every loss is measured on (the run's sources)."""
    settings: dict[str, Any]
    """The fine-tune and segment settings used (optimizer, steps, lr, batch size, seed ...)."""
    theta0_norm: float
    displacement: dict[str, float]
    """‖θ_s − θ_0‖ per source."""
    distance: dict[str, float]
    """‖θ_a − θ_b‖ per pair ``a~b``."""
    displacement_cosine: dict[str, float]
    """cos(θ_a − θ_0, θ_b − θ_0) per pair."""
    losses: dict[str, dict[str, float]]
    """Validation losses of θ_0 (key ``"theta0"``) and of each θ_s (key s)."""
    finetune_loss: dict[str, list[float]]
    """Training loss of each fine-tune step (on its own batch, before the update)."""
    tau: list[float]
    segments: dict[str, dict[str, list[float]]]
    """Per pair, the loss curves along θ(τ) (τ from 0 at θ_a to 1 at θ_b, a < b)."""
    barrier: dict[str, dict[str, float]]
    """Per pair, max along the segment − the mean of its two ends, for each curve."""
    barrier_linear: dict[str, dict[str, float]]
    """Per pair, max over τ of L(θ(τ)) − ((1−τ)·L(θ_a) + τ·L(θ_b)): the rise above the
    straight line between the ends (the linear-mode-connectivity barrier; 0 for a convex
    curve). For a curve whose ends differ (a single source's loss, high at one end and low
    at the other) ``barrier`` is at least half that difference, this one is not."""
    states: dict[str, dict[str, torch.Tensor]] | None = field(default=None, repr=False)
    """The fine-tuned parameters θ_s (name → tensor, CPU), with ``keep_states=True``."""

    @property
    def relative_displacement(self) -> dict[str, float]:
        return {k: v / self.theta0_norm for k, v in self.displacement.items()}

    @property
    def relative_distance(self) -> dict[str, float]:
        return {k: v / self.theta0_norm for k, v in self.distance.items()}

    @property
    def mean_relative_distance(self) -> float:
        values = list(self.relative_distance.values())
        return sum(values) / len(values) if values else math.nan

    @property
    def mean_barrier(self) -> float:
        """Mean over pairs of the barrier of the mean-over-sources loss."""
        values = [b[MEAN] for b in self.barrier.values()]
        return sum(values) / len(values) if values else math.nan

    @property
    def mean_barrier_linear(self) -> float:
        """Mean over pairs of the rise above the chord of the mean-over-sources loss."""
        values = [b[MEAN] for b in self.barrier_linear.values()]
        return sum(values) / len(values) if values else math.nan

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-ready numbers (without the states), plus the relative values."""
        out = asdict(self)
        out.pop("states")
        out["relative_displacement"] = self.relative_displacement
        out["relative_distance"] = self.relative_distance
        out["mean_relative_distance"] = self.mean_relative_distance
        out["mean_barrier"] = self.mean_barrier
        out["mean_barrier_linear"] = self.mean_barrier_linear
        return out


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in tensors])))


def _dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> float:
    return float(sum(torch.vdot(x.double().reshape(-1), y.double().reshape(-1)) for x, y in zip(xs, ys)))


@torch.no_grad()
def _validation_losses(model: torch.nn.Module, val: dict[str, list]) -> dict[str, float]:
    """Mean loss per source over its batches, and their mean: the same arithmetic as the
    trainer's evaluation, so θ_0's numbers equal the run's eval rows."""
    was_training = model.training
    model.eval()
    try:
        out = {name: sum(float(lm_loss(model, b)) for b in batches) / len(batches) for name, batches in val.items()}
    finally:
        model.train(was_training)
    out[MEAN] = sum(out.values()) / len(out)
    return out


@torch.no_grad()
def _set(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    for p, v in zip(params, values):
        p.copy_(v)


def minima_distance(checkpoint_dir: str | Path, sources: Sequence[str] | None = None, *, steps: int = 100,
                    lr: float = 3e-4, batch_size: int | None = None, segment_points: int = 11, seed: int = 0,
                    weight_decay: float = 0.0, grad_clip: float = 0.0, eval_batches: int | None = None,
                    device: str = "cpu", keep_states: bool = False) -> MinimaDistance:
    """Fine-tune a checkpoint on each source alone and compare the endpoints (module docstring).

    The fine-tune: ``steps`` steps of **plain AdamW from fresh state at constant ``lr``**,
    with the run's betas and eps, ``weight_decay`` (default 0) on matrices only as in the
    trainer, and ``grad_clip`` (default 0 = none), on ``batch_size`` sequences (default: the
    run's) of the source's training split. Batch k of source s is
    ``BatchSampler(..., seed=seed).source_batch(s, k)`` and dropout (if the run has any) is
    seeded by ``seed`` in a forked RNG, so the result is a pure function of the checkpoint
    and the arguments, and the global RNG is left alone.

    Why not the run's own optimizer and state: the diagnostic compares checkpoints of runs
    trained with *different* optimizers (AdamW against Nexus). Continuing each with its own
    optimizer, or with Adam moments accumulated on the mixture (or, for Nexus, on
    pseudo-gradients of another scale), would make the probe differ between the two things
    being compared. One fixed probe — the same fresh AdamW, lr, steps and batches for every
    checkpoint — makes the distances comparable. Constant lr because the fine-tune is a
    short probe, not a schedule; no weight decay by default because decay pulls every θ_s
    toward 0 alike and would shrink the distances for reasons unrelated to the sources.
    A fresh Adam moves each coordinate by about ``lr`` per step whatever the gradient's
    scale, so ‖θ_s − θ_0‖ is bounded by roughly lr·steps·√P; distances between θ_a and θ_b
    mostly reflect how far the sources' directions disagree (``displacement_cosine``).

    ``sources``: the sources to fine-tune on (default: all of the run's); every loss is
    measured on all of the run's sources. ``eval_batches``: validation batches per source
    (default: the run's ``eval.batches``). ``keep_states``: also return every θ_s.
    """
    checkpoint = Path(checkpoint_dir)
    if not checkpoint.is_dir():
        raise UserError(f"checkpoint folder '{checkpoint}' not found")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UserError(f"fine-tune steps must be a whole number >= 1, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise UserError(f"fine-tune lr must be a finite number > 0, got {lr!r}")
    if isinstance(segment_points, bool) or not isinstance(segment_points, int) or segment_points < 2:
        raise UserError(f"segment_points must be a whole number >= 2 (the two ends at least), got {segment_points!r}")
    state = read_state(checkpoint)  # checksums first: a corrupt checkpoint is named before anything loads
    config = checkpoint_config(checkpoint)
    run_dir = checkpoint.parent.parent
    if config.data.tokenizer != "bytes" and not (run_dir / TOKENIZER_FILE).is_file():
        raise UserError(f"{run_dir / TOKENIZER_FILE} is missing; the run's tokenizer is needed to fine-tune it")
    batch_size = config.data.batch_size if batch_size is None else batch_size
    eval_batches = config.eval.batches if eval_batches is None else eval_batches
    block = config.model.block_size
    tokenizer = make_run_tokenizer(config, run_dir, save=False)
    all_sources = data_lib.load_sources(config.data.sources, tokenizer=tokenizer, val_fraction=config.data.val_fraction,
                                        max_bytes=config.data.max_bytes, seed=config.seed, block_size=block + 1)
    names = sorted(all_sources) if sources is None else sorted(dict.fromkeys(sources))
    unknown = [s for s in names if s not in all_sources]
    if unknown:
        raise UserError(f"source(s) {', '.join(unknown)} not in the run; its sources are {', '.join(all_sources)}")
    if not names:
        raise UserError("no sources to fine-tune on; name at least one")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    val = data_lib.validation_batches(all_sources, batch_size=config.data.batch_size, block_size=block,
                                      n_batches=eval_batches, seed=config.seed)
    val = {name: [tuple(t.to(dev) for t in b) for b in batches] for name, batches in val.items()}
    sampler = data_lib.BatchSampler(all_sources, batch_size=batch_size, block_size=block, seed=seed, split="train")

    model = build_model(config.model, tokenizer.vocab_size)
    load_checkpoint(checkpoint, model, None)
    model.to(dev)
    named = list(model.named_parameters())  # distinct parameters: tied weights once
    params = [p for _, p in named]
    theta0 = [p.detach().clone() for p in params]
    betas = tuple(config.optim.betas) if len(config.optim.betas) == 2 else (0.9, 0.95)
    settings = {"optimizer": "adamw (fresh state, constant lr)", "steps": steps, "lr": float(lr),
                "betas": list(betas), "eps": config.optim.eps, "weight_decay": float(weight_decay),
                "grad_clip": float(grad_clip), "batch_size": batch_size, "block_size": block, "seed": seed,
                "segment_points": segment_points, "eval_batches": eval_batches,
                "dropout": config.model.dropout}

    losses = {THETA0: _validation_losses(model, val)}
    thetas: dict[str, list[torch.Tensor]] = {}
    finetune_loss: dict[str, list[float]] = {}
    for name in names:
        _set(params, theta0)
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=config.optim.eps)
        trace = []
        model.train()
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            for k in range(steps):
                x, y = (t.to(dev) for t in sampler.source_batch(name, k))
                optimizer.zero_grad(set_to_none=True)
                loss = lm_loss(model, (x, y))
                if not torch.isfinite(loss):
                    raise UserError(f"the fine-tune on '{name}' reached a non-finite loss at step {k + 1}; "
                                    "lower the fine-tune lr")
                loss.backward()
                if grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                trace.append(float(loss.detach()))
        finetune_loss[name] = trace
        thetas[name] = [p.detach().clone() for p in params]
        losses[name] = _validation_losses(model, val)

    theta0_norm = _norm(theta0)
    steps_of = {name: [t - t0 for t, t0 in zip(thetas[name], theta0)] for name in names}
    displacement = {name: _norm(d) for name, d in steps_of.items()}
    distance, cosine, segments, barrier, excess = {}, {}, {}, {}, {}
    tau = [i / (segment_points - 1) for i in range(segment_points)]
    for a, b in itertools.combinations(names, 2):  # names are sorted: a < b
        key = pair_name(a, b)
        distance[key] = _norm([ta - tb for ta, tb in zip(thetas[a], thetas[b])])
        denominator = displacement[a] * displacement[b]
        cosine[key] = _dot(steps_of[a], steps_of[b]) / denominator if denominator > 0 else math.nan
        curves: dict[str, list[float]] = {e: [] for e in [*val, MEAN]}
        for t in tau:
            with torch.no_grad():
                # (1−τ)·θ_a + τ·θ_b: exactly θ_a at τ = 0 and θ_b at τ = 1 (a lerp a + τ(b − a) is not).
                for p, ta, tb in zip(params, thetas[a], thetas[b]):
                    p.copy_(ta * (1.0 - t) + tb * t)
            for e, value in _validation_losses(model, val).items():
                curves[e].append(value)
        segments[key] = curves
        barrier[key] = {e: max(c) - (c[0] + c[-1]) / 2 for e, c in curves.items()}
        excess[key] = {e: max(v - ((1 - t) * c[0] + t * c[-1]) for t, v in zip(tau, c)) for e, c in curves.items()}
    _set(params, theta0)
    states = None
    if keep_states:
        states = {name: {n: t.detach().cpu().clone() for (n, _), t in zip(named, thetas[name])} for name in names}
    return MinimaDistance(
        checkpoint=str(checkpoint), step=int(state["step"]), sources=names, eval_sources=list(val),
        settings=settings, theta0_norm=theta0_norm, displacement=displacement, distance=distance,
        displacement_cosine=cosine, losses=losses, finetune_loss=finetune_loss, tau=tau, segments=segments,
        barrier=barrier, barrier_linear=excess, states=states)
