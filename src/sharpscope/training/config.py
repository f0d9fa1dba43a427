"""Settings of a training run: one dataclass per concern, each field documented.

Loaded with ``sharpscope.config.load_config(TrainConfig, path, overrides)`` from TOML and
dotted overrides (``optim.lr=1e-3``); the resolved config is written into the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelConfig:
    preset: str = "tiny"
    """Size preset (see ``sharpscope.training.model.PRESETS``): nano, tiny, mini, small,
    medium, large."""
    n_layer: int = 0
    """Transformer blocks; 0 takes the preset's."""
    n_head: int = 0
    """Attention heads; 0 takes the preset's."""
    d_model: int = 0
    """Residual width; 0 takes the preset's."""
    block_size: int = 128
    """Context length in tokens (also the length of training sequences)."""
    positions: str = "learned"
    """'learned' absolute positions or 'rope'."""
    dropout: float = 0.0
    """Dropout during training."""
    tie_embeddings: bool = True
    """Output head shares the token embedding."""


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=lambda: ["code"])
    """Data sources: built-in 'code', 'prose', 'arithmetic', a text file or folder, or a
    .bin token file; 'name:path' names a user source."""
    weights: list[float] = field(default_factory=list)
    """Mixture weights, one per source (empty = equal)."""
    batch_size: int = 16
    """Sequences per training batch."""
    val_fraction: float = 0.05
    """Fraction of each source held out for validation."""
    max_bytes: int = 2_000_000
    """Cap on the bytes read per built-in corpus (keeps start-up fast)."""
    tokenizer: str = "bytes"
    """'bytes' (256 tokens, no training) or 'bpe' (byte-level BPE trained on the training
    split of the sources, saved as RUN/tokenizer.json for resume and measure)."""
    vocab_size: int = 1024
    """BPE vocabulary size (ignored for bytes)."""


@dataclass
class OptimConfig:
    name: str = "adamw"
    """A key of ``training.optimizers.OPTIMIZER_REGISTRY``: adamw, sgd (with momentum), sam,
    functional-sam, angle-sam or nexus. The last four wrap ``base`` (see docs/optimizers.md)."""
    base: str = "adamw"
    """Base optimizer that the SAM family and Nexus hand their gradient to: adamw or sgd
    (``training.optimizers.BASE_OPTIMIZERS``)."""
    lr: float = 3e-3
    """Peak learning rate."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    momentum: float = 0.9
    """SGD momentum."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping); with the SAM family and
    Nexus the final gradient (the one the base optimizer takes) is clipped."""
    rho: float = 0.05
    """SAM family: perturbation radius ρ (Euclidean norm of the perturbation)."""
    rho_warmup_steps: int = 0
    """SAM family: ρ ramps linearly from ρ/W to ρ over this many steps (0 = full ρ at once)."""
    precondition: bool = False
    """SAM family: perturb in Adam's geometry, ρ·M⁻¹g/‖M⁻¹g‖ with M = √v̂ + ε (base adamw)."""
    phi: float = 0.7853981633974483
    """angle-sam: angle φ in radians (0 = Functional-SAM, π/2 = logit path, π/4 ≈ SAM)."""
    inner_steps: int = 4
    """nexus: K inner steps per outer step, each on batch_size/K sequences (so an outer
    step reads as many tokens as one AdamW step)."""
    inner_lr: float = 0.01
    """nexus: inner step length γ (steps are normalised: each moves θ' by γ)."""
    pseudo_grad: str = "mean"
    """nexus: scaling of θ − θ'_K handed to the base: mean (÷γK), sum (÷γ) or displacement."""
    inner_lr_follows_schedule: bool = False
    """nexus: scale γ with the lr schedule (γ·lr_t/lr_peak)."""
    source_order: str = "cycle"
    """nexus: source of each inner micro-batch: cycle (through the sources in turn, going on
    across steps), random (drawn by the mixture weights) or mixed (mixture micro-batches)."""


@dataclass
class ScheduleConfig:
    name: str = "cosine"
    """cosine, linear, constant, wsd (warmup-stable-decay) or cosine_restarts."""
    warmup_steps: int = 20
    """Linear warmup steps."""
    min_ratio: float = 0.1
    """Final lr as a fraction of the peak."""
    decay_steps: int = 0
    """wsd: length of the final decay (0 = 20% of the run)."""
    cycle_steps: int = 0
    """cosine_restarts: first cycle length (0 = a quarter of the run)."""
    warmup: str = "fixed"
    """"fixed" (a linear warmup of warmup_steps) or "auto": raise the lr only as fast as
    the measured critical lr η_c allows (docs/warmup.md; warmup_steps is then ignored and
    the run's warmup length is the step where the lr first reaches the schedule)."""
    warmup_target: float = 0.5
    """auto: keep lr / η̄ at most this (η̄ the smoothed η_c)."""
    warmup_growth: float = 1.2
    """auto: largest factor by which the lr may grow from one step to the next."""
    warmup_init: float = 0.01
    """auto: first lr as a fraction of the peak (also the lowest lr of the warmup)."""
    warmup_smoothing: float = 0.5
    """auto: weight kept from the past in the moving average of η_c (0: the latest)."""
    warmup_every: int = 1
    """auto: measure η_c every this many steps while warming up (then monitor.every)."""
    warmup_max_fraction: float = 0.25
    """auto: the curvature cap holds until this fraction of the run; then the lr climbs
    by warmup_growth per step to the schedule."""


@dataclass
class MonitorConfig:
    every: int = 250
    """Critical sharpness every this many steps (0 = off). A measurement costs 5-15
    forward passes of the probe batch, about 3-6 training steps of the same batch size
    (the further apart the measurements, the less the warm start helps): every 250 keeps
    the monitor within about 2% of training time. Denser for short runs and studies."""
    method: str = "fast"
    """Line search: 'fast' or 'paper'."""
    rtol: float = 0.0625
    """Relative bracket width of the line search."""
    probe_batch_size: int = 16
    """Sequences in a probe micro-batch (for probe = "fixed": drawn once from the
    validation split)."""
    probe: str = "step"
    """Where the loss along the update is measured: "step" (the batch the step was computed
    on), "fixed" (probe_batches micro-batches of held-out sequences, the same at every
    measurement) or "next" (the next training batch). "step" fails least (the update
    descends on its own batch) and costs least; see "Probe choices" in docs/measures.md
    for the measured comparison."""
    probe_batches: int = 1
    """probe = "fixed": micro-batches of probe_batch_size sequences in the probe (a larger
    probe costs forward passes, not memory)."""
    probe_target: float = 0.0
    """probe = "fixed" with several probe_batches: use the fewest micro-batches (doubling
    from 1) whose standard error of λ_c is at most this fraction of λ_c (0 = use all)."""
    exact_every: int = 0
    """λ_max, trace and (AdamW) preconditioned sharpness every this many steps (0 = off)."""
    lanczos_iters: int = 20
    """Lanczos iterations for λ_max."""
    trace_samples: int = 16
    """Hutchinson probes for the trace."""


@dataclass
class GuardConfig:
    """The stability guard on the monitor's measurements (docs/guard.md); needs
    ``monitor.every`` > 0. Every field but ``action`` has the default of
    ``sharpscope.curvature.guard.GuardSettings``."""

    action: str = "off"
    """"off", "warn" (log stability/alarm and a line), "cap" (scale the lr down while the
    ratio is high, back up while it is not) or "stop" (end the run with a checkpoint)."""
    threshold: float = 1.0
    """Alarm when the smoothed lr/η_c stays above this."""
    patience: int = 2
    """Consecutive measurements above the threshold before the alarm."""
    smoothing: float = 0.8
    """Weight kept from the past in the moving average of η_c (0: none)."""
    confidence: float = 1.0
    """Standard errors of the smoothed η_c the ratio must clear (0: judge the ratio itself)."""
    cap_factor: float = 0.5
    """cap: each alarm scales the lr by cap_factor·min(1, threshold/ratio)."""
    recovery: float = 1.0
    """cap: each measurement at or below the threshold multiplies the scale by this, up to 1
    (1: a cut is kept)."""
    min_scale: float = 0.01
    """cap: lowest lr scale."""
    noisy_probe: str = "skip"
    """A not_descent measurement whose update descends on its own batch: "skip" or "zero"."""


@dataclass
class EvalConfig:
    every: int = 100
    """Validation every this many steps, plus at the start and the end (0 = start and end)."""
    batches: int = 4
    """Validation batches per source."""
    arithmetic_problems: int = 50
    """Problems for exact-match accuracy (when 'arithmetic' is a source; 0 = off)."""
    gradient_agreement: bool = True
    """With two or more sources: cosine similarity of the per-source gradients on the
    validation batches (``grad_cosine/a~b``, ``grad_cosine/mean``), one backward per batch."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Checkpoint every this many steps (0 = only at the end)."""
    keep: int = 2
    """Most recent checkpoints kept."""


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    """Also write TensorBoard event files to RUN/tensorboard (needs tensorboard)."""
    wandb: bool = False
    """Also log to Weights & Biases in offline mode under RUN/wandb (needs wandb)."""
    wandb_project: str = "sharpscope"
    """W&B project name."""


@dataclass
class TrainConfig:
    name: str = "run"
    """Run name (recorded in the run's config)."""
    group: str = "training"
    """Study group the run belongs to (the analysis groups runs by it)."""
    groups: list[str] = field(default_factory=list)
    """Further study groups the run also belongs to (a study's cosine run at a schedule
    scale is both a 'scales' and a 'schedules' run)."""
    seed: int = 0
    """Seed of initialisation, data order and dropout."""
    steps: int = 200
    """Optimizer steps."""
    device: str = "cpu"
    """'cpu', 'cuda' or 'cuda:N'."""
    parallel: str = "ddp"
    """How the model is spread over processes under torchrun: 'ddp' (replicated on every
    rank, gradients all-reduced) or 'fsdp' (FSDP2: ``fully_shard`` on every transformer
    Block, then on the root model; parameters, gradients and optimizer state sharded over
    the ranks). Single-process runs ignore it."""
    on_nonfinite: str = "stop"
    """Non-finite training loss: 'stop' with a clear message, or 'skip' the step."""
    log_every: int = 1
    """Write a train/loss row every this many steps."""
    progress: bool = True
    """Progress bar on stderr."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
