"""Curvature of saved checkpoints: λ_c along the optimizer's next update, λ_max, the trace
and (Adam) preconditioned sharpness, on batches from a data source.

What can be measured (:func:`find_checkpoints`):

* one of our checkpoints, ``RUN/checkpoints/stepNNNNNNNN`` (the run's ``config.json``
  rebuilds the model and optimizer; checksums are checked first);
* a Hugging Face model folder (``config.json`` + safetensors), loaded through
  transformers from local files only (see :mod:`.hf`);
* a folder of checkpoints, ``checkpoint-N`` (a ``transformers.Trainer`` output folder) or
  ``stepN`` (our ``RUN/checkpoints``, or ``RUN`` itself): each is measured, in step order.

The direction (``direction``):

* ``"auto"``: the checkpoint's own optimizer step when its state is there (ours always;
  a Trainer checkpoint's ``optimizer.pt`` when it loads with ``weights_only=True``),
  else the gradient; the output says which and why.
* ``"optimizer"``: the checkpoint's own step, or an error when it has no usable state.
* ``"gradient"``: d = ∇L on the measured batches (λ_c of plain gradient descent).
* ``"adam"``: one Adam step (β = (0.9, 0.999), ε = 1e-8, no weight decay) whose moments
  were warmed on ``warm_batches`` further batches' gradients at this checkpoint.

The optimizer's step is taken on the measured batches and undone; ``max_grad_norm``
clips that gradient first, as a training loop that clips would. The lr reported beside
η_c is the one the checkpoint's schedule gives its next step (ours: the run's schedule;
a Trainer's: ``scheduler.pt``), or ``lr`` when given.

With ``out``, the measurements become a run in the run format (one metrics row per
checkpoint) that ``sharpscope analyze`` reads. See docs/cli/measure.md.
"""

from __future__ import annotations

import json
import math
import re
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..curvature import (CriticalSharpnessResult, NonFiniteLossError, critical_sharpness, hessian_eigenvalues,
                         hessian_trace, preconditioned_sharpness, update_direction)
from ..errors import UserError
from ..runs import CONFIG_FILE, METRICS_FILE, read_run, write_run
from ..sizes import size_label
from . import hf
from ..training import data as data_lib
from ..training.checkpoint import CHECKPOINTS, STATE_FILE, checkpoint_config, load_checkpoint, read_state
from ..training.optimizers import build_optimizer, plain_optimizer
from ..training.trainer import TOKENIZER_FILE, build_model, lm_loss, lm_sequence_losses, make_run_tokenizer, run_lr
from ..metrics import (CRITICAL, CRITICAL_SE, ETA_C, EVALS, LAMBDA_MAX, LR_OVER_ETA_C, PRECONDITIONED,
                       PRECONDITIONED_RATIO, PRECONDITIONED_THRESHOLD, TRACE, TRACE_PER_PARAM, TRACE_STDERR,
                       TRAIN_LOSS, TWO_OVER_LR, eval_loss_key)

DIRECTIONS = ("auto", "optimizer", "gradient", "adam")
# Adam of the "adam" fallback: torch's defaults, which most language-model runs keep.
WARM_BETAS, WARM_EPS = (0.9, 0.999), 1e-8
# Sequence length for Hugging Face models when --block-size is not given: long enough to
# see the model's attention at work, short enough to keep Hessian products cheap.
DEFAULT_HF_BLOCK = 256
# Stand-in lr for taking the optimizer's step when the schedule's is 0 (the last checkpoint
# of a linear decay): Adam's and SGD's Δθ/lr does not depend on the lr.
_STAND_IN_LR = 1e-3
_STEP_FOLDER = re.compile(r"^(?:checkpoint-|step)(\d+)$")


# --------------------------------------------------------------------------- options


@dataclass
class MeasureOptions:
    """How each checkpoint is measured (the CLI flags of ``sharpscope measure``)."""

    batch_size: int = 16
    """Sequences per measured batch."""
    n_batches: int = 1
    """Batches from the source's validation split; their mean loss is measured."""
    block_size: int | None = None
    """Tokens predicted per sequence. Ours: at most the run's (default: the run's).
    Hugging Face: default min(256, the model's positions - 1)."""
    lanczos_iters: int = 30
    """Lanczos iterations for λ_max (and preconditioned sharpness); 0 skips both."""
    trace_samples: int = 32
    """Hutchinson probes for the trace; 0 skips it."""
    seed: int = 0
    """Seed of the measured batches."""
    direction: str = "auto"
    """auto, optimizer, gradient or adam (see the module notes)."""
    warm_batches: int = 8
    """Batches whose gradients warm the moments of the "adam" direction."""
    max_grad_norm: float | None = None
    """Clip the gradient of the direction to this global norm first (None: no clipping)."""
    lr: float | None = None
    """The lr to compare with η_c, instead of the checkpoint's schedule."""
    device: str = "auto"
    """auto (a GPU when there is one), cpu, cuda, cuda:N."""

    def check(self) -> None:
        for name, value, low in (("--batch-size", self.batch_size, 1), ("--batches", self.n_batches, 1),
                                 ("--lanczos-iters", self.lanczos_iters, 0),
                                 ("--trace-samples", self.trace_samples, 0), ("--warm-batches", self.warm_batches, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"{name} must be a whole number >= {low}, got {value!r}")
        if self.trace_samples == 1:
            raise UserError("--trace-samples must be 0 (no trace) or at least 2 (a standard error needs two probes)")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise UserError(f"--block-size must be a whole number >= 1, got {self.block_size!r}")
        if self.direction not in DIRECTIONS:
            raise UserError(f"--direction must be one of {', '.join(DIRECTIONS)}, got {self.direction!r}")
        for name, value in (("--max-grad-norm", self.max_grad_norm), ("--lr", self.lr)):
            if value is not None and not (math.isfinite(value) and value > 0):
                raise UserError(f"{name} must be a positive number, got {value!r}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            device = torch.device(self.device)
        except (RuntimeError, ValueError):
            raise UserError(f"--device '{self.device}' is not a device; use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {self.device}: this machine has no CUDA GPU; use --device cpu")
        return device


# --------------------------------------------------------------------------- finding checkpoints


@dataclass
class Checkpoint:
    path: Path
    kind: str
    """"sharpscope" (ours) or "hf" (a Hugging Face model folder)."""
    step: int
    """Optimizer steps taken (0 when unknown: a plain save_pretrained folder)."""


@dataclass
class Series:
    """What a PATH names: its checkpoints in step order and the folder they belong to."""

    path: Path
    kind: str
    checkpoints: list[Checkpoint]
    home: Path
    """The run (ours) or the folder holding the checkpoints (Trainer output folder)."""

    @property
    def name(self) -> str:
        return self.home.resolve().name or "measured"


def _kind(folder: Path) -> str | None:
    if (folder / STATE_FILE).is_file():
        return "sharpscope"
    if hf.is_model_folder(folder):
        return "hf"
    return None


def _step_folders(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for path in folder.iterdir():
        match = _STEP_FOLDER.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def find_checkpoints(path: str | Path) -> Series:
    """The checkpoints a PATH names (one, or a series in step order); UserError otherwise.

    Every checkpoint is checked before anything is measured (our checksums; Hugging Face
    weights present and in safetensors), so a bad one in a series is named up front.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"'{path}' not found; give a checkpoint folder, a Hugging Face model folder "
                        f"or a folder of checkpoints")
    if not path.is_dir():
        raise UserError(f"'{path}' is a file; give the folder that holds it (a checkpoint or model folder)")
    inner = path / CHECKPOINTS
    search = inner if (path / CONFIG_FILE).is_file() and inner.is_dir() else path
    # Checkpoint folders win over a model saved at the top of the same folder: a Trainer
    # output folder holds both (trainer.save_model), and its series is what is asked for.
    folders = [] if (path / STATE_FILE).is_file() else _step_folders(search)
    home = path
    if not folders:
        kind = _kind(path)
        if kind is None:
            if (path / hf.HF_CONFIG).is_file() and not (path / METRICS_FILE).is_file():
                hf.check_weights(path)  # names the missing or pickled weights
            if (path / hf.ADAPTER_CONFIG).is_file():
                raise UserError(f"'{path}' holds a PEFT adapter, not a whole model; merge it into its base model "
                                f"(model.merge_and_unload().save_pretrained(folder)) and measure that")
            raise UserError(f"'{path}' holds no checkpoint: not one of ours (no {STATE_FILE}), not a Hugging Face "
                            f"model (no {hf.HF_CONFIG} with model.safetensors), and no checkpoint-N or stepN folders")
        folders = [(None, path)]
        home = path.parent.parent if kind == "sharpscope" else (
            path.parent if _STEP_FOLDER.match(path.name) else path)
    checkpoints = []
    for name_step, folder in folders:
        kind = _kind(folder)
        if kind is None:
            if (folder / hf.HF_CONFIG).is_file():
                hf.check_weights(folder)
            if (folder / hf.ADAPTER_CONFIG).is_file():
                raise UserError(f"'{folder}' holds a PEFT adapter, not a whole model; merge it into its base model "
                                f"(model.merge_and_unload().save_pretrained(folder)) and measure that")
            raise UserError(f"'{folder}' is not a complete checkpoint (no {STATE_FILE}, no {hf.HF_CONFIG} with "
                            f"weights); delete it or measure the other checkpoints one by one")
        if kind == "sharpscope":
            step = int(read_state(folder)["step"])  # checksums: a corrupt file is named before any work
        else:
            hf.check_weights(folder)
            if name_step is None and _STEP_FOLDER.match(folder.name):
                name_step = int(_STEP_FOLDER.match(folder.name).group(1))
            step = hf.checkpoint_step(folder, name_step)
        checkpoints.append(Checkpoint(folder, kind, step if step is not None else 0))
    kinds = sorted({c.kind for c in checkpoints})
    if len(kinds) > 1:
        raise UserError(f"'{path}' mixes sharpscope and Hugging Face checkpoints; measure each kind on its own")
    steps = [c.step for c in checkpoints]
    if len(set(steps)) != len(steps):
        raise UserError(f"'{path}' holds two checkpoints of the same step ({sorted(steps)}); keep one of each")
    checkpoints.sort(key=lambda c: c.step)
    return Series(path=path, kind=kinds[0], checkpoints=checkpoints, home=home)


# --------------------------------------------------------------------------- models and data


@dataclass
class Loaded:
    """One checkpoint, loaded: the model, its own optimizer (None when unusable) and its lr."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    optimizer_note: str
    lr: float | None
    lr_source: str
    extra: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None


def _take_batches(source: data_lib.TokenSource, options: MeasureOptions, block_size: int,
                  device: torch.device) -> tuple[list, list]:
    """The measured batches and, for the "adam" direction, the warm-up batches after them."""
    sampler = data_lib.BatchSampler({source.name: source}, batch_size=options.batch_size, block_size=block_size,
                                    seed=options.seed, split="val")
    n_warm = options.warm_batches if options.direction == "adam" else 0

    def batch(k):
        return tuple(t.to(device) for t in sampler.batch_at(k))

    return ([batch(k) for k in range(options.n_batches)],
            [batch(k) for k in range(options.n_batches, options.n_batches + n_warm)])


class RunCheckpoints:
    """Checkpoints of one sharpscope run: the model and optimizer rebuilt from its config."""

    loss_fn = staticmethod(lm_loss)
    sequence_loss_fn = staticmethod(lm_sequence_losses)

    def __init__(self, series: Series, data: str, options: MeasureOptions, device: torch.device):
        first = series.checkpoints[0].path
        self.config = checkpoint_config(first)
        self.run_dir = first.parent.parent
        self.device = device
        config = self.config
        if config.data.tokenizer != "bytes" and not (self.run_dir / TOKENIZER_FILE).is_file():
            raise UserError(f"{self.run_dir / TOKENIZER_FILE} is missing; the run's tokenizer is needed to measure it")
        tokenizer = make_run_tokenizer(config, self.run_dir, save=False)
        self.vocab_size = tokenizer.vocab_size
        self.block_size = options.block_size or config.model.block_size
        if self.block_size > config.model.block_size:
            raise UserError(f"--block-size {self.block_size} is longer than the run's block_size "
                            f"{config.model.block_size}; use at most that")
        self.source = data_lib.load_source(data, tokenizer=tokenizer, max_bytes=config.data.max_bytes, seed=options.seed)
        data_lib.check_vocab({self.source.name: self.source}, self.vocab_size)
        self.batches, self.warm = _take_batches(self.source, options, self.block_size, device)
        run = json.loads((self.run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        self.n_params = run.get("n_params")
        self.identity = {k: run[k] for k in ("model", "optimizer", "schedule", "seed") if k in run}
        self.identity["measured_run"] = run.get("name", self.run_dir.name)

    def total_steps(self, checkpoint: Checkpoint) -> int | None:
        return self.config.steps

    def load(self, checkpoint: Checkpoint) -> Loaded:
        config = self.config
        model = build_model(config.model, self.vocab_size).to(self.device)
        optimizer = build_optimizer(config.optim, model)
        state = load_checkpoint(checkpoint.path, model, optimizer)
        step = int(state["step"])
        lr, lr_source = run_lr(config, state, min(step, config.steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        model.eval()
        # The SAM family and Nexus: the direction their base optimizer takes from the plain gradient.
        base = plain_optimizer(optimizer)
        name = config.optim.name if base is optimizer else f"{config.optim.base} (base of {config.optim.name})"
        extra = {"tokens": int(state["tokens"])} if isinstance(state.get("tokens"), (int, float)) else {}
        return Loaded(model, base, f"{name} state from the checkpoint", lr, lr_source, extra,
                      checkpoint.path)


def _hf_source(spec: str, folders: list[Path], options: MeasureOptions) -> data_lib.TokenSource:
    """The measured source for a Hugging Face model: a .bin file's tokens as they are, or
    the validation split of a text source (cut exactly as ``train`` cuts it) encoded with
    the tokenizer saved beside the model."""
    resolved = data_lib.resolve_spec(spec, val_fraction=0.05, max_bytes=None, seed=options.seed)
    if not isinstance(resolved, data_lib.Text):
        return data_lib.load_source(spec, seed=options.seed)
    tokenizer, where = hf.find_tokenizer(folders)
    if tokenizer is None:
        places = " or ".join(f"'{f}'" for f in folders)
        raise UserError(f"no tokenizer saved in {places}, and --data {spec} is text; save the tokenizer there "
                        f"(tokenizer.save_pretrained(folder)) or pass a token .bin file as --data")
    _, val_docs = data_lib.split_text(resolved, 0.05, char_boundary=True)
    tokens = hf.encode(tokenizer, [d.decode("utf-8", errors="replace") for d in val_docs])
    return data_lib.TokenSource(name=resolved.name, train=np.zeros(0, np.int64), val=tokens, origin=resolved.origin,
                                tokenizer=f"{type(tokenizer).__name__} from {where}", tokens_per_byte=None)


class HFCheckpoints:
    """Hugging Face checkpoints: models through transformers, a Trainer's AdamW from optimizer.pt."""

    loss_fn = staticmethod(hf.causal_lm_loss)
    sequence_loss_fn = staticmethod(hf.causal_lm_sequence_losses)

    def __init__(self, series: Series, data: str, options: MeasureOptions, device: torch.device):
        first = series.checkpoints[0].path
        self.device = device
        self.options = options
        config = hf.model_config(first)
        limit = hf.positions(first)
        self.block_size = options.block_size or (min(DEFAULT_HF_BLOCK, limit - 1) if limit and limit > 1
                                                 else DEFAULT_HF_BLOCK)
        if limit is not None and self.block_size + 1 > limit:
            raise UserError(f"--block-size {self.block_size} needs {self.block_size + 1} positions, the model has "
                            f"{limit}; use --block-size {limit - 1} or less")
        folders = list(dict.fromkeys(p for p in (first, series.home, first.parent) if p.is_dir()))
        self.source = _hf_source(data, folders, options)
        vocab = config.get("vocab_size")
        if isinstance(vocab, int) and vocab > 0:
            data_lib.check_vocab({self.source.name: self.source}, vocab)
        self.batches, self.warm = _take_batches(self.source, options, self.block_size, device)
        self.n_params = None
        self.identity = {k: config[k] for k in ("model_type", "architectures") if k in config}
        self._max_steps = {c.step: hf.max_steps(c.path) for c in series.checkpoints}

    def total_steps(self, checkpoint: Checkpoint) -> int | None:
        return self._max_steps.get(checkpoint.step)

    def load(self, checkpoint: Checkpoint) -> Loaded:
        model = hf.load_model(checkpoint.path, self.device)
        if self.n_params is None:
            self.n_params = sum(p.numel() for p in model.parameters())
        try:
            optimizer, note = hf.load_optimizer(checkpoint.path, model)
        except UserError as exc:
            if self.options.direction in ("auto", "optimizer"):
                raise
            # not needed for the direction asked for: only preconditioned sharpness goes without it
            optimizer, note = None, str(exc)
        lr, lr_source = hf.scheduled_lr(checkpoint.path, optimizer)
        return Loaded(model, optimizer, note, lr, lr_source, hf.logged(checkpoint.path, checkpoint.step),
                      checkpoint.path)


def open_checkpoints(series: Series, data: str, options: MeasureOptions,
                     device: torch.device | None = None) -> "RunCheckpoints | HFCheckpoints":
    """The loader of a series' checkpoints, with the measured batches made once for all
    (``.batches``, ``.loss_fn``, ``.sequence_loss_fn``, ``.load(checkpoint) -> Loaded``)."""
    device = device or options.torch_device()
    return (RunCheckpoints if series.kind == "sharpscope" else HFCheckpoints)(series, data, options, device)


# --------------------------------------------------------------------------- directions


class _ClippedStep:
    """An optimizer whose step first clips the gradient's global norm (as a training loop
    that clips does); state and groups are the wrapped optimizer's own."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float):
        self.optimizer = optimizer
        self.max_norm = max_norm

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        return self.optimizer.step()


def _lr_value(lr) -> float:
    return float(lr.item() if isinstance(lr, torch.Tensor) else lr)


@contextmanager
def _steppable(optimizer: torch.optim.Optimizer):
    """Groups with lr 0 (the end of a linear decay) get a stand-in lr while the step is
    taken: the direction is Δθ/lr, which needs lr > 0 and for Adam and SGD does not depend on it."""
    saved = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        if not _lr_value(g["lr"]) > 0:
            g["lr"] = g.get("initial_lr") or _STAND_IN_LR
    try:
        yield
    finally:
        for g, lr in zip(optimizer.param_groups, saved):
            g["lr"] = lr


def _clip(grads: list[torch.Tensor], max_norm: float | None) -> list[torch.Tensor]:
    if max_norm is None:
        return grads
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    scale = min(1.0, max_norm / (norm + 1e-6))  # the factor clip_grad_norm_ applies
    return [g * scale for g in grads] if scale < 1 else grads


def _warmed_adam(model, loss_fn, warm: list, batches: list, max_norm: float | None) -> list[torch.Tensor]:
    """One Adam step on ``batches`` whose moments hold the gradients of ``warm`` at θ (as if
    Adam had seen those batches without moving): the update an Adam run would take here."""
    params = [p for p in model.parameters() if p.requires_grad]
    b1, b2 = WARM_BETAS
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for batch in warm:
        for g, mi, vi in zip(_clip(update_direction(model, loss_fn, [batch]), max_norm), m, v):
            mi.mul_(b1).add_(g, alpha=1 - b1)
            vi.mul_(b2).addcmul_(g, g, value=1 - b2)
    optimizer = torch.optim.Adam(params, lr=_STAND_IN_LR, betas=WARM_BETAS, eps=WARM_EPS)
    for p, mi, vi in zip(params, m, v):
        optimizer.state[p] = {"step": torch.tensor(float(len(warm))), "exp_avg": mi, "exp_avg_sq": vi}
    stepper = _ClippedStep(optimizer, max_norm) if max_norm is not None else optimizer
    return update_direction(model, loss_fn, batches, stepper)


def direction_for(loaded: Loaded, target, options: MeasureOptions) -> tuple[list[torch.Tensor], str, str]:
    """(d, its name, why this one) for one checkpoint, following ``options.direction``."""
    model, loss_fn, batches = loaded.model, target.loss_fn, target.batches
    mode = options.direction
    if mode in ("auto", "optimizer") and loaded.optimizer is not None:
        stepper = loaded.optimizer if options.max_grad_norm is None else _ClippedStep(loaded.optimizer,
                                                                                     options.max_grad_norm)
        with _steppable(loaded.optimizer):
            return update_direction(model, loss_fn, batches, stepper), "optimizer", loaded.optimizer_note
    if mode == "optimizer":
        raise UserError(f"--direction optimizer: {loaded.optimizer_note} ('{loaded.checkpoint}'); use "
                        f"--direction auto to fall back to the gradient")
    why = f"{loaded.optimizer_note}; " if mode == "auto" else ""
    if mode == "adam":
        return (_warmed_adam(model, loss_fn, target.warm, batches, options.max_grad_norm), "adam",
                f"{why}Adam (betas {WARM_BETAS}, eps {WARM_EPS:g}, no weight decay) with moments warmed on "
                f"{len(target.warm)} batches at this checkpoint")
    grads = _clip(update_direction(model, loss_fn, batches), options.max_grad_norm)
    return grads, "gradient", f"{why}the gradient of the measured loss"


def _adam_state(optimizer) -> bool:
    return (optimizer is not None and bool(optimizer.state)
            and all("betas" in g for g in optimizer.param_groups))


# --------------------------------------------------------------------------- measuring


def _nan_to_none(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def _measure_one(target, checkpoint: Checkpoint, options: MeasureOptions) -> dict[str, Any]:
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    loaded = target.load(checkpoint)
    seconds["load"] = time.perf_counter() - t0
    lr, lr_source = loaded.lr, loaded.lr_source
    if options.lr is not None:
        lr, lr_source = options.lr, "--lr"
        if loaded.optimizer is not None:
            for group in loaded.optimizer.param_groups:
                group["lr"] = lr
    model, loss_fn, batches = loaded.model, target.loss_fn, target.batches
    t0 = time.perf_counter()
    direction, direction_name, direction_note = direction_for(loaded, target, options)
    seconds["direction"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        # Per-row losses (their mean is loss_fn): λ_c then has its standard error. The
        # direction and the exact references keep the model's own loss, as training has it.
        crit = critical_sharpness(model, target.sequence_loss_fn, batches, direction,
                                  eta0=lr if lr and lr > 0 else None)
    except NonFiniteLossError:
        # A diverged checkpoint: recorded as such, so the rest of a series is still measured.
        crit = CriticalSharpnessResult(sharpness=math.nan, eta=math.nan, evals=1, status="nonfinite_loss",
                                       method="fast", rtol=1 / 16, loss0=math.nan)
    seconds["critical"] = time.perf_counter() - t0
    usable_lr = lr is not None and lr > 0
    finite = math.isfinite(crit.loss0)
    out: dict[str, Any] = {
        "checkpoint": str(checkpoint.path), "step": checkpoint.step, "data": target.source.name, "loss": crit.loss0,
        "lr": lr,
        CRITICAL: crit.sharpness, CRITICAL_SE: crit.stderr, ETA_C: crit.eta, "critical_status": crit.status,
        EVALS: crit.evals,
        LR_OVER_ETA_C: lr / crit.eta if lr is not None and crit.eta > 0 else math.nan,
    }
    if options.lanczos_iters > 0 and finite:
        t0 = time.perf_counter()
        eig = hessian_eigenvalues(model, loss_fn, batches, k=1, max_iter=options.lanczos_iters, tol=1e-4)
        out[LAMBDA_MAX] = eig.values[0]
        seconds["lambda_max"] = time.perf_counter() - t0
    if options.trace_samples > 0 and finite:
        t0 = time.perf_counter()
        trace = hessian_trace(model, loss_fn, batches, samples=options.trace_samples)
        out.update({TRACE: trace.estimate, TRACE_STDERR: trace.stderr,
                    TRACE_PER_PARAM: trace.per_param})
        seconds["trace"] = time.perf_counter() - t0
    out[TWO_OVER_LR] = 2.0 / lr if usable_lr else math.nan
    if _adam_state(loaded.optimizer) and options.lanczos_iters > 0 and usable_lr and finite:
        t0 = time.perf_counter()
        pre = preconditioned_sharpness(model, loss_fn, batches, loaded.optimizer, max_iter=options.lanczos_iters,
                                       tol=1e-4)
        out[PRECONDITIONED] = pre.value
        out[PRECONDITIONED_THRESHOLD] = pre.threshold
        seconds["preconditioned"] = time.perf_counter() - t0
    out.update({"direction": direction_name, "direction_note": direction_note, "lr_source": lr_source})
    out["_row"] = _metrics_row(out, crit, target, checkpoint, loaded)
    out["seconds"] = seconds
    return out


def _metrics_row(result: dict[str, Any], crit, target, checkpoint: Checkpoint, loaded: Loaded) -> dict[str, Any]:
    """The run-format row of one measured checkpoint."""
    row: dict[str, Any] = {"step": checkpoint.step}
    total = target.total_steps(checkpoint)
    if total:
        row["t"] = min(checkpoint.step / total, 1.0)
    if "tokens" in loaded.extra:
        row["tokens"] = loaded.extra["tokens"]
    row["lr"] = result["lr"]
    if TRAIN_LOSS in loaded.extra:
        row[TRAIN_LOSS] = loaded.extra[TRAIN_LOSS]
    row[eval_loss_key(result["data"])] = result["loss"]
    row.update(crit.as_metrics())
    for key in (LR_OVER_ETA_C, TWO_OVER_LR, LAMBDA_MAX,
                TRACE_PER_PARAM, PRECONDITIONED):
        if key in result:
            row[key] = _nan_to_none(result[key])
    if PRECONDITIONED in result:
        row[PRECONDITIONED_RATIO] = result[PRECONDITIONED] / result[
            PRECONDITIONED_THRESHOLD]
    return row


@dataclass
class MeasureResult:
    """Everything ``measure_path`` measured: one result per checkpoint, in step order."""

    series: Series
    results: list[dict[str, Any]]
    """Per checkpoint: the printed measurements (``checkpoint``, ``step``, ``loss``, ``lr``,
    ``sharpness/...``, ``direction``, ``direction_note``, ``lr_source``, ``seconds``)."""
    reused: list[int]
    """Steps whose rows were already in ``--out`` (same settings) and were not measured again."""
    out: Path | None
    config: dict[str, Any] | None


def _settings(series: Series, data: str, options: MeasureOptions, block_size: int) -> dict[str, Any]:
    """What identifies a measured run: a rerun with the same settings continues it."""
    settings = {k: v for k, v in asdict(options).items() if k != "device"}
    settings.update(path=str(series.path.resolve()), data=data, block_size=block_size)
    if options.direction != "adam":
        settings.pop("warm_batches")
    return settings


def _previous_rows(out: Path, settings: dict[str, Any], force: bool) -> tuple[dict[int, dict], dict[str, str]]:
    """Rows (by step) and directions of a measured run already in ``out`` with the same
    settings; nothing when ``out`` is new. Refuses anything else unless ``force``."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' is a file; give a folder for the run")
    if not out.is_dir() or not any(out.iterdir()):
        return {}, {}
    if not (out / CONFIG_FILE).is_file():
        raise UserError(f"--out '{out}' is a folder that holds no run; give a new or empty folder")
    # Anything beside the run's two files (checkpoints/, model weights, a tokenizer) means a
    # trained run or a model folder: never replaced by a measurement, damaged or not.
    others = sorted(p.name for p in out.iterdir() if p.name not in (CONFIG_FILE, METRICS_FILE)
                    and not p.name.startswith("."))
    try:
        run = read_run(out)
    except UserError:
        if others:
            raise UserError(f"--out '{out}' holds more than a measured run ({', '.join(others[:3])}); "
                            "give another folder") from None
        if force:
            return {}, {}
        raise UserError(f"--out '{out}' holds a damaged run; pass --force to replace it or give another folder") from None
    if run.config.get("measure") == settings:
        directions = run.config.get("directions") or {}
        return {int(r["step"]): r for r in run.metrics}, {str(k): v for k, v in directions.items()}
    if force and others:
        raise UserError(f"--out '{out}' holds a run with more than its two files ({', '.join(others[:3])}); "
                        f"--force replaces only runs of config.json and metrics.jsonl, give another folder")
    if force:
        return {}, {}
    what = "a run measured with other settings" if "measure" in run.config else f"another run ('{run.name}')"
    raise UserError(f"--out '{out}' holds {what}; pass --force to replace it or give another folder")


def measure_path(path: str | Path | Series, data: str, options: MeasureOptions | None = None, *,
                 out: str | Path | None = None, force: bool = False, name: str | None = None, progress: bool = True,
                 on_result: Callable[[dict[str, Any]], None] | None = None) -> MeasureResult:
    """Measure every checkpoint PATH names, in step order (see the module notes); ``path``
    may also be the :class:`Series` that :func:`find_checkpoints` returned for it.

    ``out``: write a run there (rewritten whole and atomically after each checkpoint, so an
    interruption keeps what was measured); when it already holds a run measured from the
    same PATH with the same settings, its rows are kept and only new checkpoints are
    measured. Any other run there is refused unless ``force`` (then replaced).
    ``on_result`` is called with each checkpoint's result as soon as it is measured.
    """
    options = options or MeasureOptions()
    options.check()
    series = path if isinstance(path, Series) else find_checkpoints(path)
    device = options.torch_device()
    target = open_checkpoints(series, data, options, device)
    out = Path(out).expanduser() if out is not None else None
    settings = _settings(series, data, options, target.block_size)
    previous, directions = _previous_rows(out, settings, force) if out is not None else ({}, {})
    todo = [c for c in series.checkpoints if c.step not in previous]
    # Rows of checkpoints deleted since (a Trainer's save_total_limit) are still measurements: kept.
    rows = dict(previous)
    results: list[dict[str, Any]] = []
    bar = None
    if progress and len(todo) > 1:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="measure", unit="ckpt", file=sys.stderr, dynamic_ncols=True)
    config = None
    # transformers' one-time notes from inside a forward ("loss_type=None ...") are not the user's concern
    hush = hf.quiet() if series.kind == "hf" else nullcontext()
    try:
        with hush:
            _measure_all(todo, target, options, rows, directions, results, out, series, data, name, settings,
                         bar, on_result)
    finally:
        if bar is not None:
            bar.close()
    if out is not None and results:
        config = _run_config(series, target, data, name, settings, directions)
    if out is not None and config is None and previous:
        config = read_run(out).config  # nothing new to measure: the run stays as it was
    reused = sorted(set(previous) & {c.step for c in series.checkpoints})
    return MeasureResult(series=series, results=results, reused=reused, out=out, config=config)


def _measure_all(todo, target, options, rows, directions, results, out, series, data, name, settings, bar,
                 on_result) -> None:
    for checkpoint in todo:
        result = _measure_one(target, checkpoint, options)
        rows[checkpoint.step] = result.pop("_row")
        directions[str(checkpoint.step)] = result["direction"]
        results.append(result)
        if out is not None:  # the whole run so far, atomically: an interruption keeps every measured row
            write_run(out, _run_config(series, target, data, name, settings, directions),
                      [rows[s] for s in sorted(rows)])
        if on_result is not None:
            on_result(result)
        if bar is not None:
            bar.set_postfix_str(f"step {checkpoint.step} λ_c {result[CRITICAL]:.4g}", refresh=False)
            bar.update(1)


def _run_config(series: Series, target, data: str, name: str | None, settings: dict[str, Any],
                directions: dict[str, str]) -> dict[str, Any]:
    kinds = sorted(set(directions.values()))
    n_params = target.n_params
    return {
        "name": name or series.name, "n_params": n_params, "source": "measured", "group": "training",
        "model": size_label(n_params) if n_params else None,
        **target.identity,
        "checkpoints": series.kind, "measured_from": str(series.path.resolve()),
        "data": target.source.name, "data_origin": target.source.origin,
        "direction": kinds[0] if len(kinds) == 1 else "mixed", "directions": directions,
        "measure": settings,
    }


def measure_checkpoint(checkpoint: Path, data: str, *, batch_size: int = 16, n_batches: int = 1,
                       lanczos_iters: int = 30, trace_samples: int = 32, seed: int = 0,
                       **options) -> dict[str, Any]:
    """Measure one checkpoint (any kind :func:`find_checkpoints` accepts) and return its result."""
    series = find_checkpoints(checkpoint)
    if len(series.checkpoints) != 1:
        raise UserError(f"'{checkpoint}' holds {len(series.checkpoints)} checkpoints; measure_path measures a series")
    opts = MeasureOptions(batch_size=batch_size, n_batches=n_batches, lanczos_iters=lanczos_iters,
                          trace_samples=trace_samples, seed=seed, **options)
    return measure_path(series, data, opts, progress=False).results[0]
