"""The parametric model of one pretraining run: sharpness, loss, gradient norm, accuracy.

numpy only. Equations (SPEC section 5), with x = log10(N) - 7:

    S_p = 2.0 + 0.35x,  S_f = 1.2 - 0.12x,  t_p = 0.15 - 0.005x,  lambda = 3.0 + 0.2x
    S(t) = S_f + (S_p - S_f) t / t_p                    t < t_p   (rise from S_f)
    S(t) = S_f + (S_p - S_f) exp(-lambda (t - t_p))     t >= t_p  (decay to the plateau)

plus a damped oscillation after t_p, the schedule's modulation, and white noise. The rise
starts at S_f and is continuous at t_p; the source's printed rise (S_p + ...) starts at the
peak and cannot produce its own tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..schedules import lr_multiplier
from .config import MeasureConfig, OscillationConfig, SimulationConfig

@dataclass(frozen=True)
class ShapeParams:
    """Noise-free three-phase parameters of one run."""

    peak: float
    final: float
    t_peak: float
    decay: float
    offset: float = 0.0


def scale_params(cfg: SimulationConfig, n: float, *, decay_multiplier: float = 1.0,
                 peak_offset: float = 0.0) -> ShapeParams:
    x = math.log10(n) - 7.0
    tr = cfg.trajectory
    t_peak = tr.peak_time_base + tr.peak_time_slope * x + peak_offset
    if not 0.0 < t_peak < 1.0:
        raise UserError(f"peak time {t_peak:.3f} is outside (0, 1); use a smaller peak offset")
    return ShapeParams(peak=tr.peak_base + tr.peak_slope * x,
                       final=tr.final_base + tr.final_slope * x,
                       t_peak=t_peak,
                       decay=(tr.decay_base + tr.decay_slope * x) * decay_multiplier,
                       offset=tr.plateau_offset)


def three_phase(t: np.ndarray, p: ShapeParams) -> np.ndarray:
    rise = p.final + (p.peak - p.final) * t / p.t_peak
    decay = p.final + (p.peak - p.final) * np.exp(-p.decay * (t - p.t_peak))
    return np.where(t < p.t_peak, rise, decay + p.offset)


def damped_oscillation(t: np.ndarray, p: ShapeParams, osc: OscillationConfig) -> np.ndarray:
    after = np.clip(t - p.t_peak, 0.0, None)
    wave = (osc.amplitude * np.exp(-after / osc.damping)
            * np.sin(2 * np.pi * osc.cycles * after + np.deg2rad(osc.phase_degrees)))
    return np.where(t >= p.t_peak, wave, 0.0)


def _smoothed(values: np.ndarray, t: np.ndarray, tau: float) -> np.ndarray:
    """First-order lag (exponential smoothing with time constant tau) along t."""
    out = np.empty_like(values)
    out[0] = values[0]
    for i in range(1, len(values)):
        alpha = 1.0 - math.exp(-(t[i] - t[i - 1]) / tau) if tau > 0 else 1.0
        out[i] = out[i - 1] + alpha * (values[i] - out[i - 1])
    return out


def lr_curve(cfg: SimulationConfig, schedule: str, t: np.ndarray) -> np.ndarray:
    total = float(cfg.total_steps)
    ss = cfg.schedule_study
    return lr_multiplier(schedule, t * total, total, warmup_steps=cfg.warmup_fraction * total,
                         min_ratio=cfg.min_lr_ratio, decay_steps=ss.wsd_decay_fraction * total,
                         cycle_steps=ss.restart_cycle_fraction * (1 - cfg.warmup_fraction) * total)


@dataclass
class SimulatedRun:
    """Arrays over checkpoints plus the final downstream accuracies."""

    t: np.ndarray
    step: np.ndarray
    tokens: np.ndarray
    lr: np.ndarray
    sharpness: np.ndarray
    loss: np.ndarray
    grad_norm: np.ndarray
    lambda_max: np.ndarray
    trace_per_param: np.ndarray
    accuracy: dict[str, float]
    params: ShapeParams


def _measure_params(p: ShapeParams, m: MeasureConfig) -> ShapeParams:
    return ShapeParams(peak=p.peak * m.peak_scale, final=p.final * m.final_scale,
                       t_peak=p.t_peak, decay=p.decay * m.decay_scale, offset=p.offset * m.final_scale)


def simulate_run(cfg: SimulationConfig, n: float, rng: np.random.Generator, *, schedule: str = "cosine",
                 decay_multiplier: float = 1.0, peak_offset: float = 0.0,
                 noise_sigma: float | None = None) -> SimulatedRun:
    """One run at N = ``n`` parameters. Draws, in order: sharpness, loss, gradient-norm,
    lambda_max and trace noise over the checkpoints, then one accuracy noise per task."""
    t = np.linspace(0.0, 1.0, cfg.n_checkpoints)
    p = scale_params(cfg, n, decay_multiplier=decay_multiplier, peak_offset=peak_offset)
    x = math.log10(n) - 7.0
    sigma = cfg.noise_sigma if noise_sigma is None else noise_sigma
    osc = cfg.oscillation

    lr = lr_curve(cfg, schedule, t)
    lr_ref = lr_curve(cfg, "cosine", t)
    ss = cfg.schedule_study
    # Schedule modulation, zero for the cosine reference: sharpness tracks the lagged lr.
    heat = _smoothed(lr, t, ss.lag) - _smoothed(lr_ref, t, ss.lag)
    jumps = np.flatnonzero((np.diff(lr) > 0.3) & (t[1:] > cfg.warmup_fraction)) + 1

    def modulation(q: ShapeParams) -> np.ndarray:
        extra = ss.response * q.final * heat
        for j in jumps:
            after = t - t[j]
            extra = extra + np.where(after >= 0, ss.spike * q.final
                                     * np.exp(-q.decay * ss.spike_decay * np.clip(after, 0, None)), 0.0)
        return extra

    clean = three_phase(t, p) + damped_oscillation(t, p, osc) + modulation(p)
    noise_scale = sigma * lr if cfg.noise_follows_lr else np.full_like(t, sigma)
    sharpness = clean + noise_scale * rng.standard_normal(t.size)

    lc = cfg.loss
    loss_final = lc.coef * (n / lc.reference) ** (-lc.exponent)
    loss = (loss_final + (lc.initial - loss_final) * np.exp(-lc.rate * t) + lc.schedule_effect * heat
            + lc.noise_sigma * rng.standard_normal(t.size))

    g = cfg.grad_norm
    grad_sigma = g.noise_base * 10 ** (-g.noise_scale_exponent * x)
    grad_norm = (g.sharpness_coef * clean + g.decay_coef * np.exp(-t / g.decay_time)
                 + grad_sigma * rng.standard_normal(t.size))

    measures = []
    for mcfg in (cfg.spectral, cfg.trace):
        q = _measure_params(p, mcfg)
        ratio = q.peak / p.peak
        m_clean = (three_phase(t, q) + ratio * damped_oscillation(t, q, osc)
                   + modulation(q))
        measures.append(m_clean * (1 + mcfg.noise_sigma * rng.standard_normal(t.size)))

    acc_cfg = cfg.accuracy
    tail = max(1, int(round(0.1 * t.size)))
    final_sharpness = float(np.mean(sharpness[-tail:]))
    accuracy = {}
    for k, task in enumerate(acc_cfg.tasks):
        value = (acc_cfg.base[k] + acc_cfg.slope[k] * x - acc_cfg.sharpness_coef * (final_sharpness - 1.2)
                 + acc_cfg.noise_sigma * rng.standard_normal())
        accuracy[task] = float(np.clip(value, 0.0, 1.0))

    step = np.round(t * cfg.total_steps).astype(int)
    return SimulatedRun(t=t, step=step, tokens=np.round(t * cfg.tokens_per_param * n), lr=cfg.peak_lr * lr,
                        sharpness=sharpness, loss=loss, grad_norm=grad_norm, lambda_max=measures[0],
                        trace_per_param=measures[1], accuracy=accuracy, params=p)
