"""Nexus: an outer optimizer driven by K normalised inner steps across data sources.

One outer step, from θ (``inner_steps`` = K, ``inner_lr`` = γ):

    θ'_0 = θ
    for m = 1..K:  g_m = ∇L_{s_m}(θ'_{m−1}) on micro-batch m (from source s_m),
                   θ'_m = θ'_{m−1} − γ · g_m / (‖g_m‖ + norm_eps)     (global norm)
    Δ = (θ − θ'_K) / (γK)                                              (pseudo_grad="mean")
    the base optimizer steps with Δ in place of the gradient; θ' is discarded.

A second-order expansion gives Δ ≈ (1/K)Σ ĝ_m − (γ/K)·Σ_m Σ_{j<m} H_m ĝ_j: the second term
is minus the gradient of the inner products ⟨ĝ_j, ĝ_m⟩ between micro-batches, so when the
micro-batches cycle through the data sources Nexus also climbs cross-source gradient
agreement. Every choice is a parameter:

* ``pseudo_grad``: "mean" (default) divides the displacement by γK, so Δ is the mean of
  the normalised inner gradients to first order and has norm ≤ 1 whatever K and γ are;
  "sum" divides by γ; "displacement" hands over θ − θ'_K unscaled.
* ``inner_lr_follows_schedule``: γ_t = γ · lr_t / lr_0 (lr_0 the first group's lr at
  construction) so the inner steps shrink with the outer schedule; off by default (γ fixed).
* Which source each micro-batch comes from is the caller's: with ``step(closure)`` the
  closure is called K times and reads ``optimizer.inner_step`` (0..K−1) to choose; the
  trainer cycles the sources in order (or samples them, ``nexus.source_order``).

Cost: K forward+backward passes per outer step on K micro-batches, the compute of K-step
gradient accumulation, plus one parameter copy (θ). Under DDP every inner gradient is
all-reduced (the replicas must walk the same θ'), K reductions where accumulation has one.

Logged in ``stats``: ``inner_cosine`` = mean over m ≥ 2 of cos(g_m, Σ_{j<m} ĝ_j), the
agreement of each inner gradient with the steps already taken (computed from θ − θ'_{m−1},
no extra memory, one more read of θ and θ' per inner step; ``track_agreement=False``
skips it, NaN then); ``inner_grad_norm`` (mean ‖g_m‖); ``pseudo_grad_norm`` (‖Δ‖); ``inner_lr``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ._wrapper import PassOptimizer, global_norm

__all__ = ["Nexus", "PSEUDO_GRAD_SCALINGS"]

PSEUDO_GRAD_SCALINGS = ("mean", "sum", "displacement")


class Nexus(PassOptimizer):
    """``Nexus(params, base_optimizer=torch.optim.AdamW, inner_steps=4, inner_lr=0.01,
    pseudo_grad="mean", inner_lr_follows_schedule=False, track_agreement=True, norm_eps=1e-12, grad_clip=0.0,
    model=None, **base_kwargs)``; see the module docstring."""

    repeat_passes = False  # each inner step sees a new micro-batch and fresh dropout masks
    sync_every_pass = True

    def __init__(self, params, base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
                 inner_steps: int = 4, inner_lr: float = 0.01, *, pseudo_grad: str = "mean",
                 inner_lr_follows_schedule: bool = False, track_agreement: bool = True, norm_eps: float = 1e-12,
                 grad_clip: float = 0.0,
                 model: torch.nn.Module | None = None, **base_kwargs):
        if not (isinstance(inner_steps, int) and inner_steps >= 1):
            raise ValueError(f"inner_steps must be a whole number >= 1, got {inner_steps}")
        if not (inner_lr > 0 and math.isfinite(inner_lr)):
            raise ValueError(f"inner_lr must be a finite number > 0, got {inner_lr}")
        if pseudo_grad not in PSEUDO_GRAD_SCALINGS:
            raise ValueError(f"pseudo_grad must be one of {', '.join(PSEUDO_GRAD_SCALINGS)}, got '{pseudo_grad}'")
        super().__init__(params, base_optimizer, {}, base_kwargs, model=model, grad_clip=grad_clip)
        self.inner_steps = inner_steps
        self.inner_lr = float(inner_lr)
        self.pseudo_grad = pseudo_grad
        self.inner_lr_follows_schedule = bool(inner_lr_follows_schedule)
        self.track_agreement = bool(track_agreement)  # may be switched per step (e.g. on logged steps)
        self.norm_eps = float(norm_eps)
        self.peak_lr = self._group_lr()
        self.inner_step = 0
        self._gamma = self.inner_lr
        self._cosines: list[float] = []
        self._grad_norms: list[float] = []
        self._touched: set[int] = set()

    @property
    def num_passes(self) -> int:
        return self.inner_steps

    def _group_lr(self) -> float:
        lr = self.param_groups[0]["lr"]
        return float(lr.item() if isinstance(lr, torch.Tensor) else lr)

    def current_inner_lr(self) -> float:
        if not self.inner_lr_follows_schedule or self.peak_lr <= 0:
            return self.inner_lr
        return self.inner_lr * self._group_lr() / self.peak_lr

    def passes(self):
        self._gamma = self.current_inner_lr()
        self._cosines, self._grad_norms, self._touched = [], [], set()
        for k in super().passes():
            self.inner_step = k
            yield k
        self.inner_step = 0

    @torch.no_grad()
    def _inner_update(self, k: int) -> None:
        used = [(i, p) for i, p in enumerate(self._params()) if p.grad is not None]
        if not used:
            raise RuntimeError("no parameter received a gradient in this inner step")
        params = [p for _, p in used]
        grads = [p.grad for p in params]
        grad_norm = global_norm(grads)
        self._grad_norms.append(grad_norm)
        unit = 1.0 / (grad_norm + self.norm_eps)  # ĝ = g·unit
        if k > 0 and self.track_agreement:
            # cos(g_k, S) with S = Σ_{j<k} ĝ_j = (θ − θ'_k)/γ: the dot reads θ and θ' one tensor
            # at a time; ‖S‖² is carried along (‖S + ĝ‖² = ‖S‖² + 2⟨S, ĝ⟩ + ‖ĝ‖²), so no
            # gradient is stored and no full-size temporary is made.
            dot_gS = sum(torch.vdot(g.reshape(-1), (self._origin[i] - p).reshape(-1)).to(grad_norm.device)
                         for (i, p), g in zip(used, grads)) / self._gamma
            self._cosines.append(dot_gS / (grad_norm * self._sum_sq.sqrt()))
            self._sum_sq = self._sum_sq + 2 * dot_gS * unit + (grad_norm * unit) ** 2
        elif k == 0:
            self._sum_sq = (grad_norm * unit) ** 2
        # The gradients are spent after this step: scale them in place into the update.
        torch._foreach_mul_(grads, -self._gamma * unit)
        torch._foreach_add_(params, grads)
        self._touched.update(i for i, _ in used)
        self._moved = True

    def _backward(self, k: int, outputs: torch.Tensor, loss: torch.Tensor) -> None:
        loss.backward()
        self._inner_update(k)
        self._zero_grads()

    @torch.no_grad()
    def _before_base_step(self) -> None:
        scale = {"mean": self._gamma * self.inner_steps, "sum": self._gamma, "displacement": 1.0}[self.pseudo_grad]
        pseudo = []
        for i, (o, p) in enumerate(zip(self._origin, self._params())):
            if i in self._touched:  # a parameter no inner step reached keeps grad None, as in AdamW
                p.grad = (o - p).div_(scale)
                pseudo.append(p.grad)
        self._stats = {
            "inner_cosine": torch.stack(self._cosines).mean() if self._cosines else math.nan,
            "inner_grad_norm": torch.stack(self._grad_norms).mean(),
            "pseudo_grad_norm": global_norm(pseudo),
            "inner_lr": self._gamma,
        }

    def _describe(self) -> str:
        return f"inner_steps={self.inner_steps}, inner_lr={self.inner_lr}, pseudo_grad={self.pseudo_grad}"
