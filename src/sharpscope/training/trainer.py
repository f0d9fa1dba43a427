"""The training loop: a GPT on the configured sources, with the sharpness monitor live.

One iteration (``step`` counts optimizer updates done, 0-based inside the loop):
  1. lr from the schedule (a pure function of the step, so resume needs only the count;
     an automatic warmup's controller keeps its state in the checkpoint);
  2. the sampler's batch for this step (a pure function of seed and position);
  3. forward, backward, clip, then the optimizer step inside the monitor's
     ``around_step`` (the monitor captures the update direction and measures λ_c on its
     fixed probe batch every N steps without perturbing anything);
  4. the step hooks, in order (``Trainer.step_hooks``, see hooks.py): the metrics row,
     exact curvature and evaluation on their cadence, the row to ``metrics.jsonl``,
     checkpoints on theirs, progress.

Resume loads the latest complete checkpoint (weights, optimizer, RNG, sampler position,
monitor warm start, automatic warmup), drops metric rows logged after it, and continues:
on CPU the rest of the run is bit-for-bit the run that was never interrupted.

Under torchrun the model is either replicated (``parallel="ddp"``) or sharded with FSDP2
(``parallel="fsdp"``: ``fully_shard`` per Block, then the root). Every FSDP forward and
backward is collective, so under FSDP every rank runs every evaluation in lockstep on the
same full batches (rank 0 alone writes), and every forward without grad is followed by a
reshard: FSDP leaves the root's parameters unsharded after one, and the next forward would
read them instead of the shards the optimizer has updated since.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..config import to_dict
from ..errors import UserError
from ..runs import METRICS_FILE, RunWriter
from ..schedules import SCHEDULES, lr_multiplier
from ..sizes import size_label
from ..curvature import SharpnessMonitor, exact_references
from ..curvature.guard import ACTIONS as GUARD_ACTIONS, GuardSettings, check_guard_settings
from ..curvature.monitor import PROBES
from ..curvature.agreement import gradient_agreement
from ..signals import AutoWarmup, WarmupSettings, check_warmup_settings
from . import data as data_lib
from .checkpoint import (gather_full_state, list_checkpoints, load_checkpoint, rng_state, save_checkpoint,
                         set_rng_state)
from .config import ModelConfig, TrainConfig
from .hooks import STEP_HOOKS, ProgressBar, StepHook, StepResult
from .model import GPT, PRESETS, GPTConfig, count_parameters
from .optimizers import build_optimizer, optimizer_spec
from ..metrics import (ARITHMETIC_ACCURACY, ETA_C, EVAL_LOSS, LAMBDA_MAX, PRECONDITIONED, PRECONDITIONED_RATIO,
                       TRACE_PER_PARAM, eval_loss_key)


def lm_logits_and_loss(model: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits_BxTxV, mean next-token cross-entropy in nats per token) of an (inputs,
    targets) batch: the closure form of the SAM family and Nexus."""
    x, y = batch
    logits = model(x)
    return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def lm_loss(model: torch.nn.Module, batch) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token) of a (inputs, targets) batch."""
    return lm_logits_and_loss(model, batch)[1]


def lm_sequence_losses(model: torch.nn.Module, batch) -> torch.Tensor:
    """Per-sequence mean next-token cross-entropy (1-D, one value per row): the monitor's
    loss, whose mean is :func:`lm_loss` (every row has the same length) and whose rows let
    the critical-sharpness search report its standard error over the probe's sequences."""
    x, y = batch
    logits = model(x)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
    return per_token.view(y.shape).mean(dim=-1)


TOKENIZER_FILE = data_lib.TOKENIZER_FILE


def make_run_tokenizer(config: TrainConfig, run_dir: Path, *, save: bool = True):
    """The run's tokenizer: bytes, or BPE trained once and kept in the run directory (so
    resume and ``sharpscope measure`` read the same vocabulary back)."""
    if config.data.tokenizer == "bytes":
        return data_lib.ByteTokenizer()
    path = Path(run_dir) / TOKENIZER_FILE
    if not save and not path.exists():
        path = None  # other ranks train the same deterministic tokenizer without writing it
    elif save:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
    return data_lib.make_tokenizer(config.data.tokenizer, vocab_size=config.data.vocab_size,
                                   train_specs=config.data.sources, max_bytes=config.data.max_bytes, path=path,
                                   val_fraction=config.data.val_fraction, seed=config.seed)


def build_model(cfg: ModelConfig, vocab_size: int) -> GPT:
    if cfg.preset not in PRESETS:
        raise UserError(f"unknown model preset '{cfg.preset}'; choose one of {', '.join(PRESETS)}")
    n_layer, n_head, d_model = PRESETS[cfg.preset]
    try:
        gpt = GPTConfig(
            vocab_size=vocab_size, block_size=cfg.block_size, n_layer=cfg.n_layer or n_layer,
            n_head=cfg.n_head or n_head, d_model=cfg.d_model or d_model, dropout=cfg.dropout,
            positions=cfg.positions, tie_embeddings=cfg.tie_embeddings,
        )
    except ValueError as exc:
        raise UserError(f"model settings: {exc}") from None
    return GPT(gpt)


def lr_at(config: TrainConfig, step: int, *, warmup_steps: int | None = None) -> float:
    """The schedule's lr at ``step``; ``warmup_steps`` replaces the configured warmup length
    (an automatic warmup's measured length, or the step itself for its ceiling)."""
    s = config.schedule
    return config.optim.lr * float(lr_multiplier(
        s.name, step, config.steps, warmup_steps=s.warmup_steps if warmup_steps is None else warmup_steps,
        min_ratio=s.min_ratio, decay_steps=s.decay_steps or None, cycle_steps=s.cycle_steps or None,
    ))


def run_lr(config: TrainConfig, state: dict, step: int) -> tuple[float, str]:
    """The lr the run takes at ``step``, read from a checkpoint's state, and where it comes
    from (``measure`` and ``mix`` name it). An automatic warmup
    (schedule.warmup = "auto") measured its length W: after it the schedule of a fixed
    W-step warmup; during it the controller's last lr (the next depends on a reading the
    checkpoint does not have)."""
    warmup = state.get("warmup") if getattr(config.schedule, "warmup", "fixed") == "auto" else None
    if not isinstance(warmup, dict):
        return lr_at(config, step), "the run's schedule"
    if warmup.get("end") is not None:
        return lr_at(config, step, warmup_steps=int(warmup["end"])), "the run's schedule after its auto warmup"
    if warmup.get("lr") is not None:
        return float(warmup["lr"]), "the run's auto warmup (its last lr)"
    return lr_at(config, step), "the run's schedule"


WARMUPS = ("fixed", "auto")

# ScheduleConfig's auto-warmup fields and the controller's settings they set.
_WARMUP_FIELDS = {"warmup_target": "target", "warmup_growth": "growth", "warmup_init": "init",
                  "warmup_smoothing": "smoothing", "warmup_every": "every", "warmup_max_fraction": "max_fraction"}


def warmup_settings(config: TrainConfig) -> WarmupSettings:
    """The automatic warmup's settings from ``[schedule]``."""
    return WarmupSettings(**{ours: getattr(config.schedule, name) for name, ours in _WARMUP_FIELDS.items()})


PARALLEL = ("ddp", "fsdp")


def _check(config: TrainConfig) -> None:
    if config.parallel not in PARALLEL:
        raise UserError(f"parallel must be one of {', '.join(PARALLEL)}, got '{config.parallel}'")
    if config.steps < 1:
        raise UserError(f"steps must be at least 1, got {config.steps}")
    if config.schedule.name not in SCHEDULES:
        raise UserError(f"unknown schedule '{config.schedule.name}'; choose one of {', '.join(SCHEDULES)}")
    if config.schedule.warmup not in WARMUPS:
        raise UserError(f"schedule.warmup must be one of {', '.join(WARMUPS)}, got '{config.schedule.warmup}'")
    if config.schedule.warmup == "auto" and config.monitor.every < 1:
        raise UserError("schedule.warmup=auto reads the monitor's measurements: set monitor.every > 0")
    # The auto-warmup and guard settings are checked even when they are not in use, so a
    # bad value fails now rather than on the run that first switches them on.
    try:
        check_warmup_settings(warmup_settings(config))
    except ValueError as exc:
        name = str(exc).split()[1]
        field = next(k for k, v in _WARMUP_FIELDS.items() if v == name)
        raise UserError(str(exc).replace(f"warmup {name}", f"schedule.{field}", 1)) from None
    if config.on_nonfinite not in ("stop", "skip"):
        raise UserError(f"on_nonfinite must be 'stop' or 'skip', got '{config.on_nonfinite}'")
    for name in ("every", "exact_every"):
        if getattr(config.monitor, name) < 0:
            raise UserError(f"monitor.{name} must be 0 (off) or a positive number of steps")
    monitor = config.monitor
    if monitor.probe not in PROBES:
        raise UserError(f"monitor.probe must be one of {', '.join(PROBES)}, got '{monitor.probe}'")
    if monitor.probe_batches < 1 or monitor.probe_batch_size < 1:
        raise UserError("monitor.probe_batches and monitor.probe_batch_size must be at least 1")
    if not 0 <= monitor.probe_target < math.inf:
        raise UserError(f"monitor.probe_target must be 0 (off) or a positive fraction such as 0.1, "
                        f"got {monitor.probe_target}")
    guard = config.guard
    if guard.action not in GUARD_ACTIONS:
        raise UserError(f"guard.action must be one of {', '.join(GUARD_ACTIONS)}, got '{guard.action}'")
    if guard.action != "off" and config.monitor.every < 1:
        raise UserError(f"guard.action={guard.action} reads the monitor's measurements: set monitor.every > 0")
    try:
        check_guard_settings(GuardSettings(**to_dict(guard)))
    except ValueError as exc:
        raise UserError(str(exc).replace("guard ", "guard.", 1)) from None
    if config.data.batch_size < 1 or config.model.block_size < 2:
        raise UserError("data.batch_size must be >= 1 and model.block_size >= 2")
    if config.data.weights and len(config.data.weights) != len(config.data.sources):
        raise UserError(f"data.weights has {len(config.data.weights)} numbers for {len(config.data.sources)} sources")
    spec = optimizer_spec(config.optim.name)
    if spec.check is not None:
        spec.check(config)


_NEXUS_STREAM = 0x4E5855  # random stream of the nexus source draws, apart from the sampler's


def _distributed_setup(config: TrainConfig) -> tuple[int, int, bool]:
    """(world size, rank, whether we initialised the group) under torchrun, else (1, 0, False).

    torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; the group uses gloo on CPU, nccl on CUDA.
    """
    import os

    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 1, 0, False
    created = False
    if not dist.is_initialized():
        backend = "nccl" if config.device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
        created = True
    return dist.get_world_size(), dist.get_rank(), created


class Trainer:
    """Builds everything from a TrainConfig and runs it into ``out`` (a run directory)."""

    def __init__(self, config: TrainConfig, out: str | Path, *, resume: bool = False):
        _check(config)
        self.config = config
        self.out = Path(out)
        self.resume = resume
        if not resume and (self.out / METRICS_FILE).exists():
            raise UserError(f"'{self.out}' already holds a run; pass --resume to continue it or choose another --out")
        if resume and not list_checkpoints(self.out):
            raise UserError(f"'{self.out}' has no complete checkpoint to resume from")
        try:
            self.device = torch.device(config.device)
        except RuntimeError:
            raise UserError(f"unknown device '{config.device}'; use cpu, cuda or cuda:N") from None
        self.world, self.rank, self._own_group = _distributed_setup(config)
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", torch.cuda.current_device())
            for what, size in (("data.batch_size", config.data.batch_size),
                               ("monitor.probe_batch_size", config.monitor.probe_batch_size)):
                if size % self.world:
                    raise UserError(f"{what} ({size}) must be divisible by the number of processes ({self.world}): "
                                    "it is the global batch, split evenly over ranks")
        torch.manual_seed(config.seed)
        self.tokenizer = make_run_tokenizer(config, self.out, save=self.rank == 0)
        self.sources = data_lib.load_sources(
            config.data.sources, tokenizer=self.tokenizer, val_fraction=config.data.val_fraction,
            max_bytes=config.data.max_bytes, seed=config.seed, block_size=config.model.block_size + 1)
        data_lib.check_vocab(self.sources, self.tokenizer.vocab_size)
        names = list(self.sources)
        weights = dict(zip(names, config.data.weights)) if config.data.weights else None
        block = config.model.block_size
        self.sampler = data_lib.BatchSampler(self.sources, batch_size=config.data.batch_size, block_size=block,
                                             weights=weights, seed=config.seed, split="train")
        probe = data_lib.BatchSampler(self.sources, batch_size=config.monitor.probe_batch_size, block_size=block,
                                      weights=weights, seed=config.seed + 1, split="val")
        # This rank's share of each probe micro-batch, on the device, for every measurement.
        self.probe_shards = [self._shard(probe.batch_at(i)) for i in range(config.monitor.probe_batches)]
        val = data_lib.validation_batches(self.sources, batch_size=config.data.batch_size, block_size=block,
                                          n_batches=config.eval.batches, seed=config.seed)
        self.val = {name: [self._to_device(b) for b in batches] for name, batches in val.items()}
        self.model = build_model(config.model, self.tokenizer.vocab_size).to(self.device)
        self.n_params = count_parameters(self.model)
        self.fsdp = self.world > 1 and config.parallel == "fsdp"
        if self.fsdp:  # before the optimizer: it must hold the sharded (DTensor) parameters
            self._fully_shard()
        self._parameters = list(self.model.parameters())  # under FSDP the shards (no forward yet)
        self.optimizer = build_optimizer(config.optim, self.model)
        self.monitor = None
        if config.monitor.every > 0:
            fixed = config.monitor.probe == "fixed"
            self.monitor = SharpnessMonitor(self.model, lm_sequence_losses, self.probe_shards if fixed else None,
                                            self.optimizer, every=config.monitor.every,
                                            method=config.monitor.method, rtol=config.monitor.rtol,
                                            probe=config.monitor.probe, probe_target=config.monitor.probe_target,
                                            guard=GuardSettings(**to_dict(config.guard))
                                            if config.guard.action != "off" else None,
                                            total_steps=config.steps)
        self.warmup: AutoWarmup | None = None
        """The automatic warmup (schedule.warmup = "auto"); its state is in the checkpoint."""
        if config.schedule.warmup == "auto":
            self.warmup = AutoWarmup(warmup_settings(config), total_steps=config.steps)
        self.tokens_per_step = config.data.batch_size * block
        self.start_step = 0
        self.forward_model = self.model  # under FSDP the sharded model itself
        if self.world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            self.forward_model = DistributedDataParallel(self.model)
        # The SAM family and Nexus build their gradient from several passes (optimizer.passes()).
        self.multi_pass = hasattr(self.optimizer, "passes")
        if self.multi_pass:
            # DDP: no gradient sync in the passes before the last (FSDP2 reduces every pass;
            # see PassOptimizer._sync)
            self.optimizer.model = self.forward_model
        self.micro_sampler = None
        if optimizer_spec(config.optim.name).micro_batches:
            micro = config.data.batch_size // config.optim.inner_steps
            if micro % self.world:
                raise UserError(f"nexus micro-batches (data.batch_size / optim.inner_steps = {micro}) must be "
                                f"divisible by the number of processes ({self.world})")
            self.micro_sampler = data_lib.BatchSampler(self.sources, batch_size=micro, block_size=block,
                                                       weights=weights, seed=config.seed, split="train")
        # The work after each step, in order (see hooks.py); run() sets what they write to.
        self.step_hooks: list[StepHook] = list(STEP_HOOKS)
        self.writer: _Writer | None = None
        self.progress: ProgressBar | None = None
        self.on_step: Callable[[int, int], None] | None = None
        self.stop_reason: str | None = None
        """Set by a step hook to end the run after this step's hooks (evaluation, row and
        a final checkpoint included): the stability guard's ``stop``."""

    def _fully_shard(self) -> None:
        """FSDP2: every transformer Block, then the root (the embeddings, final norm and
        head), sharded over a one-dimensional mesh of all ranks. All ranks built the same
        initial model (same seed); each keeps its rows of every parameter."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        for block in self.model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def _reshard(self) -> None:
        """After forwards without grad (FSDP leaves the root unsharded): register the
        shards again, so the next forward all-gathers their current values."""
        if self.fsdp:
            from ..tensors.fsdp import reshard

            reshard(self.model)

    def _to_device(self, batch):
        return tuple(t.to(self.device) for t in batch)

    def _shard(self, batch):
        """This rank's rows of a global batch (contiguous, equal shares)."""
        if self.world == 1:
            return self._to_device(batch)
        share = batch[0].shape[0] // self.world
        return tuple(t[self.rank * share:(self.rank + 1) * share].to(self.device) for t in batch)

    def _global_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return value
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world

    def optimizer_stats(self) -> dict[str, float]:
        """The SAM family's and Nexus's diagnostics of the last step, averaged over ranks:
        some are this rank's (the loss at the perturbed point is its shard's), and the mean
        over equal shards is the global batch's; the others are equal on every rank."""
        stats = self.optimizer.stats
        if self.world == 1 or not stats:
            return stats
        import torch.distributed as dist

        values = torch.tensor(list(stats.values()), dtype=torch.float64, device=self.device)
        dist.all_reduce(values)
        return dict(zip(stats, (values / self.world).tolist()))

    def run_config(self) -> dict[str, Any]:
        train = to_dict(self.config)
        if self.config.guard.action == "off":
            # Absent means off (readers fill in the defaults): a run without a guard keeps
            # the config.json it always had.
            train.pop("guard")
        if self.config.schedule.warmup == "fixed":
            # Likewise a fixed warmup: the automatic warmup's settings are left out.
            for name in ("warmup", *_WARMUP_FIELDS):
                train["schedule"].pop(name)
        return {
            "name": self.config.name, "group": self.config.group, "model": size_label(self.n_params),
            "n_params": self.n_params, "source": "measured", "seed": self.config.seed,
            "schedule": self.config.schedule.name, "optimizer": self.config.optim.name,
            **({"groups": [self.config.group, *self.config.groups]} if self.config.groups else {}),
            "sources": list(self.sources), "train": train,
        }

    # -- evaluation ---------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation losses, gradient agreement and arithmetic accuracy on the full
        validation batches. Under FSDP every rank calls it (the forwards are collective)
        and computes the same numbers; otherwise rank 0 alone."""
        was_training = self.model.training
        self.model.eval()
        out: dict[str, float] = {}
        try:
            losses = []
            for name, batches in self.val.items():
                loss = sum(float(lm_loss(self.model, b)) for b in batches) / len(batches)
                out[eval_loss_key(name)] = loss
                tokens_per_byte = self.sources[name].val_tokens_per_byte
                if tokens_per_byte is not None:  # unknown for pre-tokenized .bin data
                    out[f"eval/{name}/bpb"] = data_lib.bits_per_byte(loss, tokens_per_byte)
                losses.append(loss)
            out[EVAL_LOSS] = sum(losses) / len(losses)
            if len(self.val) > 1 and self.config.eval.gradient_agreement:
                # Cross-source agreement at θ (any optimizer): what Nexus is built to raise.
                # Under FSDP every rank computes it on the same batches (the mean over
                # ranks of equal gradients is that gradient); else rank 0 alone.
                agreement = gradient_agreement(self.model, lm_loss, self.val,
                                               distributed="auto" if self.fsdp else False)
                out.update(agreement.as_metrics())
            if "arithmetic" in self.sources and self.config.eval.arithmetic_problems > 0:
                out[ARITHMETIC_ACCURACY] = self.arithmetic_accuracy()
        finally:
            self.model.train(was_training)
            self._reshard()
        return out

    def arithmetic_accuracy(self) -> float:
        """Exact match of greedy continuations on held-out problems (seeded apart)."""
        problems = data_lib.arithmetic_problems(self.config.eval.arithmetic_problems, seed=self.config.seed + 7919)
        correct = 0
        block = self.config.model.block_size
        for prompt, answer in problems:
            ids = [int(t) for t in self.tokenizer.encode(prompt)]
            prompt_length = len(ids)
            for _ in range(len(answer) + 1):
                x = torch.tensor([ids[-block:]], device=self.device)
                ids.append(int(self.model(x)[0, -1].argmax()))
            text = self.tokenizer.decode(ids[prompt_length:])
            correct += text.split("\n")[0] == answer
        return correct / len(problems)

    def exact_curvature(self) -> dict[str, float]:
        # Every rank takes part (products are all-reduced); the run records these four.
        cfg = self.config.monitor
        refs = exact_references(self.model, lm_loss, self.probe_shards, self.optimizer,
                                lanczos_iters=cfg.lanczos_iters, trace_samples=cfg.trace_samples)
        return {k: refs[k] for k in (LAMBDA_MAX, TRACE_PER_PARAM, PRECONDITIONED, PRECONDITIONED_RATIO) if k in refs}

    # -- the loop -----------------------------------------------------------------------

    def _restore(self) -> None:
        latest = list_checkpoints(self.out)[-1]
        state = load_checkpoint(latest, self.model, self.optimizer, sharded=self.fsdp)
        self.start_step = int(state["step"])
        self.sampler.load_state_dict(state["sampler"])
        if self.monitor is not None and state.get("monitor"):
            self.monitor.load_state_dict(state["monitor"])
        if self.warmup is not None and state.get("warmup"):
            self.warmup.load_state_dict(state["warmup"])
        ranks = state.get("rng_ranks")
        if self.world > 1 and (not ranks or len(ranks) != self.world):
            raise UserError(f"{latest} was written by {len(ranks) if ranks else 1} process(es); "
                            f"resume it with the same number ({self.world} now)")
        set_rng_state(ranks[self.rank] if self.world > 1 else state["rng"])

    def write_checkpoint(self, step: int) -> None:
        """Called on every rank: each rank's RNG state (its dropout stream) is gathered so
        that resume is exact under DDP too, and under FSDP the full state dicts are
        gathered onto rank 0; rank 0 writes."""
        rng_ranks = None
        full_state = None
        if self.world > 1:
            import torch.distributed as dist

            rng_ranks = [None] * self.world
            dist.all_gather_object(rng_ranks, rng_state())
            if self.fsdp:
                full_state = gather_full_state(self.model, self.optimizer)
        if self.rank != 0:
            return
        state = {"tokens": step * self.tokens_per_step, "sampler": self.sampler.state_dict(),
                 "monitor": self.monitor.state_dict() if self.monitor else None, "rng_ranks": rng_ranks,
                 **({"warmup": self.warmup.state_dict()} if self.warmup is not None else {}),
                 **({"stopped": self.stop_reason} if self.stop_reason else {})}
        save_checkpoint(self.out, step, self.model, self.optimizer, state, keep=self.config.checkpoint.keep,
                        full_state=full_state)

    def run(self, on_step: Callable[[int, int], None] | None = None) -> Path:
        """Train to ``config.steps``; ``on_step(done, total)`` is called on rank 0 after each
        step (a study's progress display)."""
        cfg = self.config
        if self.resume:
            self._restore()
        lead = self.rank == 0  # only rank 0 writes metrics and checkpoints
        self.on_step = on_step
        if lead:
            self.out.mkdir(parents=True, exist_ok=True)
            self.writer = _Writer(self.out, self.run_config(), cfg)
            if self.resume:  # rows logged after the checkpoint are recomputed
                self.writer.record.truncate_after(self.start_step)
        if cfg.progress and lead:
            self.progress = ProgressBar(cfg, self.start_step)
        try:
            if self.start_step == 0 and (lead or self.fsdp):
                metrics = self.evaluate()
                if lead:
                    self.writer.log({"step": 0, "t": 0.0, "tokens": 0, **metrics})
            self.model.train()
            for step in range(self.start_step, cfg.steps):
                result = self._step(step)
                row: dict[str, Any] = {"step": result.done, "t": result.done / cfg.steps,
                                       "tokens": result.done * self.tokens_per_step}
                for hook in self.step_hooks:
                    hook(self, result, row)
                if self.stop_reason is not None:
                    break
        finally:
            if self.writer is not None:
                self.writer.close()
            if self.progress is not None:
                self.progress.close()
            self._finish_distributed()
        return self.out

    def _step(self, step: int) -> StepResult:
        """One update: lr from the schedule, the batch, the gradient, clipping, and the
        optimizer step inside the monitor's ``around_step``; a non-finite loss stops the
        run or (``on_nonfinite="skip"``) leaves θ as it was."""
        cfg = self.config
        lr = self.lr_for(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.micro_sampler is None:
            batch = self._shard(self.sampler.next_batch())
        else:  # Nexus reads its own micro-batches; the position still counts the step
            batch = None
            self.sampler.position += 1
        self.optimizer.zero_grad(set_to_none=True)
        logged = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        if self.multi_pass:
            if hasattr(self.optimizer, "track_agreement"):  # Nexus's agreement cosine only where it is logged
                self.optimizer.track_agreement = logged
            global_loss = self._multi_pass_gradient(step, batch)
        else:
            loss = lm_loss(self.forward_model, batch)
            global_loss = self._global_mean(loss.detach())
            if torch.isfinite(global_loss):
                loss.backward()
        skipped = not torch.isfinite(global_loss)
        if skipped and cfg.on_nonfinite == "stop":
            raise UserError(
                f"training loss became {float(global_loss)} at step {step + 1}; lower optim.lr or "
                "raise schedule.warmup_steps (or set on_nonfinite=skip); earlier checkpoints are intact")
        grad_norm = None
        if skipped:  # no update; evaluation, checkpoints and progress go on as scheduled
            self.optimizer.zero_grad(set_to_none=True)
            if self.warmup is not None:
                # θ already blew up at this lr's predecessors: no step size is safe here.
                self.warmup.update(eta=0.0, status="nonfinite")
            if self.fsdp:  # a forward without its backward: FSDP's per-step state reset
                from ..tensors.fsdp import recover

                recover(self.model)
        else:
            # The optimizer's parameters (under FSDP the DTensor shards, whose
            # norm clip_grad_norm_ reduces over the mesh).
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self._parameters, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf)
            with self.monitor.around_step(step, self._probe_for(step, batch), due=self._monitor_due(step)) \
                    if self.monitor is not None else nullcontext():
                self.optimizer.step()
            if self.warmup is not None and self.monitor.latest is not None and ETA_C in self.monitor.latest:
                self.warmup.update(eta=self.monitor.last.eta, status=self.monitor.last.status)
            if self.monitor is not None and self.monitor.step_lr_scale != 1.0:
                lr = lr * self.monitor.step_lr_scale  # the guard's cap: the lr this step applied
        return StepResult(step + 1, lr, global_loss, grad_norm, skipped, logged)

    def lr_for(self, step: int) -> float:
        """The lr of ``step`` before any guard scale: the schedule's, or while an automatic
        warmup lasts its controller's, which is bounded by the ceiling: the schedule's lr
        if warmup ended at this step. Once the controller reaches the ceiling (at step W),
        the schedule continues as a fixed warmup of W steps would."""
        warmup = self.warmup
        if warmup is None:
            return lr_at(self.config, step)
        if warmup.active:
            lr = warmup.step_lr(step, lr_at(self.config, step, warmup_steps=step))
            if warmup.active:
                return lr
        return lr_at(self.config, step, warmup_steps=warmup.end)

    def _monitor_due(self, step: int) -> bool:
        """The monitor's cadence, made denser by an automatic warmup while it lasts."""
        return self.monitor.due(step) or (self.warmup is not None and self.warmup.due(step))

    def _probe_for(self, step: int, batch):
        """The monitor's probe for ``probe = "step"`` (this step's batch) or ``"next"`` (the
        batch the next step will read, recomputed from the sampler's position: reading it
        here changes nothing about training); None when the probe is fixed or not due."""
        probe = self.config.monitor.probe
        if probe == "fixed" or not (self._monitor_due(step) or self.monitor.deferred_from is not None):
            return None
        if probe == "step" and batch is not None:
            return batch
        # Nexus reads micro-batches of its own; its steps are probed on the main sampler's batches.
        position = self.sampler.position - (1 if probe == "step" else 0)
        return self._shard(self.sampler.batch_at(position))

    def _nexus_micro_batch(self, step: int, k: int):
        """Inner micro-batch ``k`` of outer step ``step``: a pure function of (seed, step, k),
        so resume needs only the step count."""
        index = step * self.config.optim.inner_steps + k
        order = self.config.optim.source_order
        if order == "mixed":
            return self.micro_sampler.batch_at(index)
        names = [n for n in self.micro_sampler.names if self.micro_sampler.probabilities[n] > 0]
        if order == "cycle":
            name = names[index % len(names)]
        else:
            weights = np.array([self.micro_sampler.probabilities[n] for n in names])
            name = names[int(np.random.default_rng([self.config.seed, _NEXUS_STREAM, index]).choice(
                len(names), p=weights / weights.sum()))]
        return self.micro_sampler.source_batch(name, index)

    def _multi_pass_gradient(self, step: int, batch) -> torch.Tensor:
        """Run the passes of a SAM-family or Nexus step (the gradient it builds is left in
        ``.grad``); returns the global training loss: of the clean pass for the SAM family,
        the mean over inner micro-batches for Nexus. A non-finite loss ends the passes early
        with θ restored."""
        opt = self.optimizer
        nexus = self.micro_sampler is not None
        losses = []
        passes = opt.passes()
        try:
            for k in passes:
                if nexus:
                    batch = self._shard(self._nexus_micro_batch(step, k))
                logits, loss = lm_logits_and_loss(self.forward_model, batch)
                global_loss = self._global_mean(loss.detach())
                if not torch.isfinite(global_loss):  # at the perturbed point too: its gradient is the update
                    return global_loss
                if k == 0 or nexus:
                    losses.append(global_loss)
                opt.backward(logits, loss)
        finally:
            passes.close()
        return sum(losses) / len(losses)

    def _finish_distributed(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()  # rank 0's last checkpoint is on disk before any rank returns
            if self._own_group:
                # DDP's reducer must be gone before its process group is: destroyed after it,
                # the reducer's threads abort the process at exit.
                self.forward_model = self.model
                if self.multi_pass:
                    self.optimizer.model = None
                if self.fsdp:  # likewise the sharded model and everything holding its DTensors
                    self.forward_model = self.model = self.optimizer = self.monitor = None
                    self._parameters = []
                import gc

                gc.collect()
                dist.destroy_process_group()


class _Writer:
    """metrics.jsonl (the record) plus the optional TensorBoard / W&B sinks."""

    def __init__(self, out: Path, run_config: dict[str, Any], cfg: TrainConfig):
        from .sinks import MetricSinks

        self.record = RunWriter(out, run_config)
        try:
            self.sinks = MetricSinks(out, run_config, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                                     wandb_project=cfg.logging.wandb_project, name=cfg.name)
        except BaseException:
            self.record.close()
            raise

    def log(self, row: dict[str, Any]) -> None:
        self.record.log(row)
        self.sinks.log(row)

    def close(self) -> None:
        self.record.close()
        self.sinks.close()


def train(config: TrainConfig, out: str | Path, *, resume: bool = False,
          on_step: Callable[[int, int], None] | None = None) -> Path:
    """Run (or resume) a training run; returns the run directory."""
    return Trainer(config, out, resume=resume).run(on_step)
