"""Settings of the simulated study. Every choice the source leaves open is a field here.

Defaults reproduce the published tables with seed 42 (see docs/simulation.md for how far
each one lands and why each choice was made).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrajectoryConfig:
    """Three-phase sharpness trajectory; x = log10(N) - 7 (SPEC section 5)."""

    peak_base: float = 2.0
    """S_p at 10M parameters."""
    peak_slope: float = 0.35
    """dS_p/dx."""
    final_base: float = 1.2
    """S_f (plateau asymptote) at 10M parameters."""
    final_slope: float = -0.12
    """dS_f/dx."""
    peak_time_base: float = 0.15
    """t_p at 10M parameters (fraction of training)."""
    peak_time_slope: float = -0.005
    """dt_p/dx."""
    decay_base: float = 3.0
    """Decay rate lambda at 10M parameters (per unit of training fraction)."""
    decay_slope: float = 0.2
    """d lambda / dx."""
    plateau_offset: float = 0.0
    """Constant added to the whole trajectory after the peak (0 = the equations as given)."""


@dataclass
class OscillationConfig:
    """Damped edge-of-stability oscillation added after the peak (not given by the source)."""

    amplitude: float = 0.04
    """Amplitude at t_p, in sharpness units (0.02-0.06 fits the published peaks)."""
    cycles: float = 6.0
    """Oscillation frequency in cycles per unit of training fraction."""
    damping: float = 0.25
    """e-folding time of the amplitude, in training fraction."""
    phase_degrees: float = 90.0
    """Phase at t_p: 90 starts the ringing at its crest (the overshoot when the instability
    sets in), which is what puts the published peaks above S_p."""


@dataclass
class LossConfig:
    """L(t) = L_f + (L0 - L_f) exp(-rate t), L_f = coef (N / reference)^(-exponent)."""

    coef: float = 3.5
    reference: float = 1e9
    exponent: float = 0.076
    initial: float = 10.0
    rate: float = 5.0
    noise_sigma: float = 0.01
    """White noise on the logged training loss (absolute)."""
    schedule_effect: float = 0.05
    """Loss added per unit of (lagged lr multiplier - cosine's): a hotter end costs loss."""


@dataclass
class GradNormConfig:
    """Gradient norm = sharpness_coef * S(t) + decay_coef * exp(-t / decay_time) + noise.

    The noise is noise_base * 10^(-noise_scale_exponent * x). With a scale-independent noise
    the coupling already grows with scale, because larger models sweep a wider sharpness
    range: about 0.91 at 10M to 0.99 at 7B (the source: about 0.92 -> 0.98).
    """

    sharpness_coef: float = 0.5
    decay_coef: float = 0.2
    decay_time: float = 0.02
    noise_base: float = 0.04
    noise_scale_exponent: float = 0.0


@dataclass
class AccuracyConfig:
    """acc_task = base_task + slope_task * x - sharpness_coef * (S_final - 1.2) + noise.

    base and slope are calibrated by least squares to the published per-task table (with the
    published final sharpness); the sharpness term makes a run that ends sharper score lower
    than its scale predicts (schedules, ablations). Clipped to [0, 1].
    """

    tasks: list[str] = field(default_factory=lambda: ["hellaswag", "arc_easy", "piqa", "winogrande", "lambada"])
    base: list[float] = field(default_factory=lambda: [0.3817, 0.4062, 0.4521, 0.3575, 0.3221])
    slope: list[float] = field(default_factory=lambda: [0.0541, 0.0554, 0.0475, 0.0528, 0.0522])
    sharpness_coef: float = 0.3
    noise_sigma: float = 0.006
    """Per-task noise (the published per-task rows scatter about 0.005-0.011 around the fit)."""


@dataclass
class MeasureConfig:
    """Another curvature measure with the same three-phase shape and its own scales."""

    peak_scale: float = 1.0
    """Multiplies S_p."""
    final_scale: float = 1.0
    """Multiplies S_f."""
    decay_scale: float = 1.0
    """Multiplies lambda."""
    noise_sigma: float = 0.02
    """Relative white noise (fraction of the value)."""


@dataclass
class ScheduleStudyConfig:
    """How a learning-rate schedule modulates the trajectory.

    Sharpness follows the learning rate with a lag: S += response * S_f * (r~(t) - r~_cos(t)),
    r~ the exponentially smoothed lr multiplier (time constant ``lag``). A jump of the lr
    (a restart) also triggers a catapult spike of height spike * S_f (a fraction of the level
    it kicks) that decays at rate lambda * spike_decay.
    """

    schedules: list[str] = field(default_factory=lambda: ["cosine", "linear", "constant", "wsd", "cosine_restarts"])
    scales: list[str] = field(default_factory=lambda: ["10M", "1.3B", "7B"])
    response: float = 0.2
    lag: float = 0.03
    spike: float = 0.5
    spike_decay: float = 4.0
    wsd_decay_fraction: float = 0.2
    restart_cycle_fraction: float = 0.25


@dataclass
class AblationConfig:
    """One-factor-at-a-time ablations (6 levels each) at three scales: 54 runs by default."""

    scales: list[str] = field(default_factory=lambda: ["10M", "1.3B", "7B"])
    decay_multipliers: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    peak_offsets: list[float] = field(default_factory=lambda: [-0.05, 0.0, 0.05, 0.1, 0.2, 0.3])
    noise_sigmas: list[float] = field(default_factory=lambda: [0.0, 0.015, 0.03, 0.06, 0.09, 0.12])


@dataclass
class SimulationConfig:
    """The whole simulated study."""

    seed: int = 42
    """Seed of numpy.random.default_rng; the six scale runs draw from it in order."""
    scales: list[str] = field(default_factory=lambda: ["10M", "125M", "350M", "1.3B", "3B", "7B"])
    extrapolation_scales: list[str] = field(default_factory=lambda: ["13B", "30B", "70B"])
    n_checkpoints: int = 200
    total_steps: int = 10000
    """Optimizer steps the checkpoints are spread over (for the step column only)."""
    tokens_per_param: float = 20.0
    """Compute-optimal budget: tokens seen at t = 1 are tokens_per_param * N."""
    peak_lr: float = 3e-4
    warmup_fraction: float = 0.02
    min_lr_ratio: float = 0.1
    noise_sigma: float = 0.03
    """White noise on critical sharpness (absolute) at the peak learning rate."""
    noise_follows_lr: bool = True
    """Scale the noise by the lr multiplier: SGD's fluctuations around the valley floor grow
    with the step size, so a decayed schedule measures a quiet plateau."""
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    oscillation: OscillationConfig = field(default_factory=OscillationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    grad_norm: GradNormConfig = field(default_factory=GradNormConfig)
    accuracy: AccuracyConfig = field(default_factory=AccuracyConfig)
    spectral: MeasureConfig = field(default_factory=lambda: MeasureConfig(1.6, 1.35, 1.1, 0.02))
    """lambda_max: larger than critical sharpness (a weighted mean of eigenvalues is below the top)."""
    trace: MeasureConfig = field(default_factory=lambda: MeasureConfig(0.02, 0.015, 0.9, 0.02))
    """tr(H)/P: the mean eigenvalue, far below the top one."""
    schedule_study: ScheduleStudyConfig = field(default_factory=ScheduleStudyConfig)
    ablations: AblationConfig = field(default_factory=AblationConfig)
