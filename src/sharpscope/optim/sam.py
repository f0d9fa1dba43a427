"""Sharpness-aware minimisation: SAM, Functional-SAM and Angle-SAM, optionally preconditioned.

All three start the same way. At θ, with g = ∇L(θ), the ascent direction is

    ε* = g / (‖g‖ + eps)                        (global norm over all parameters)
    e  = ρ · ε*                                 (plain)
    e  = ρ · M⁻¹g / (‖M⁻¹g‖ + eps)              (precondition=True)

with M = diag(√v̂ + ε_adam) from the base optimizer's bias-corrected second moment (the
denominator Adam itself divides by). Normalisation used for the preconditioned
perturbation: its Euclidean norm is exactly ρ, as in plain SAM, so one ρ means the same
step length in both geometries and only the direction changes; M⁻¹ε* without
renormalising would scale ρ by 1/√v̂, a factor that drifts by orders of magnitude during
training. Before the base optimizer has second-moment state (its first step), the
perturbation is plain SAM's. Each parameter group may carry its own ``rho``.

The gradient handed to the base optimizer, with z the outputs (logits) and J = ∂z/∂θ:

    SAM             g_SAM = ∇L(θ + e)
    Functional-SAM  g_F   = J(θ + e)ᵀ · ∇_z L(θ)            (clean logit gradient, perturbed Jacobian)
    Angle-SAM       g_φ   = g + sin φ·[J(θ)ᵀ∇_z L(θ + e) − g] + cos φ·[J(θ + e)ᵀ∇_z L(θ) − g]

φ = 0 is Functional-SAM; φ = π/2 keeps only the logit path; φ = π/4 agrees with SAM to
first order in ρ. Costs (forward+backward passes per step): SAM and Functional-SAM 2;
Angle-SAM 3 when sin φ ≠ 0, because the logit path needs the clean Jacobian again after
the perturbed pass (one backward at θ carries it: J(θ)ᵀ[sin φ·∇_zL(θ+e) + (1 − sin φ −
cos φ)·∇_zL(θ)], using g = J(θ)ᵀ∇_zL(θ)). No per-parameter Jacobian is ever formed: every
J-product is one vector-Jacobian product through the network's own backward, so the
vocabulary size costs nothing extra (the kept ∇_zL(θ) is one logits-sized tensor).
The functional forms assume the loss depends on the parameters only through ``outputs``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..curvature.preconditioned import adam_preconditioner
from ._wrapper import PassOptimizer

__all__ = ["SAM", "FunctionalSAM", "AngleSAM"]

_NEGLIGIBLE = 1e-12  # |sin φ| or |cos φ| below this drops that path (cos(π/2) is 6e-17 in floats)


class _SharpnessAware(PassOptimizer):
    """Perturbation shared by the SAM family; subclasses say what pass 1 (and 2) compute."""

    def __init__(self, params, base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
                 rho: float = 0.05, *, precondition: bool = False, rho_warmup_steps: int = 0, eps: float = 1e-12,
                 grad_clip: float = 0.0, model: torch.nn.Module | None = None, **base_kwargs):
        if not (rho >= 0 and math.isfinite(rho)):
            raise ValueError(f"rho must be a finite number >= 0, got {rho}")
        if rho_warmup_steps < 0:
            raise ValueError(f"rho_warmup_steps must be >= 0, got {rho_warmup_steps}")
        super().__init__(params, base_optimizer, {"rho": float(rho)}, base_kwargs, model=model, grad_clip=grad_clip)
        if precondition and any("betas" not in g for g in self.param_groups):
            raise ValueError(f"precondition=True reads Adam's second moment; {type(self.base).__name__} has none "
                             "(use torch.optim.Adam or AdamW as the base optimizer)")
        self.precondition = bool(precondition)
        self.rho_warmup_steps = int(rho_warmup_steps)
        self.eps = float(eps)
        self._logit_grad: torch.Tensor | None = None

    def rho_factor(self) -> float:
        """Fraction of ρ used at this step: a linear warm-up from 1/W to 1 over W steps."""
        if self.rho_warmup_steps <= 0:
            return 1.0
        return min(1.0, (self.steps + 1) / self.rho_warmup_steps)

    def _perturbation_direction(self, params: list[torch.Tensor]) -> tuple[list[torch.Tensor], bool]:
        """u per parameter (M⁻¹g or g) and whether the preconditioner was used."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        if self.precondition:
            scales = adam_preconditioner(params, self.base, require_state=False)
            if not all(math.isinf(float(s.min())) for s in scales if s.numel()):
                return [g / s for g, s in zip(grads, scales)], True  # P = inf (no state) gives 0
        return grads, False

    @torch.no_grad()
    def _perturb(self) -> None:
        params = self._params()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        direction, preconditioned = self._perturbation_direction(params)
        norm = math.sqrt(sum(float(torch.sum(u.double() * u.double())) for u in direction))
        grad_norm = math.sqrt(sum(float(torch.sum(g.double() * g.double())) for g in grads))
        factor = self.rho_factor()
        rho_of = {p: group["rho"] for group in self.param_groups for p in group["params"]}
        for p, u in zip(params, direction):
            p.add_(u, alpha=factor * rho_of[p] / (norm + self.eps))
        self._moved = True
        self.stats = {"grad_norm_clean": grad_norm, "rho": factor * self.param_groups[0]["rho"],
                      "preconditioned": float(preconditioned)}

    def _clean_pass(self, outputs: torch.Tensor, loss: torch.Tensor, keep_logit_grad: bool) -> None:
        if keep_logit_grad:
            # ∂L/∂z at θ, kept (detached) for the perturbed pass; then g = ∇L(θ) as usual.
            self._logit_grad = torch.autograd.grad(loss, outputs, retain_graph=True)[0].detach()
        loss.backward()
        self._perturb()
        self._zero_grads()

    def _record_perturbed_loss(self, loss: torch.Tensor) -> None:
        self.stats["loss_perturbed"] = float(loss.detach())
        self.stats["loss_increase"] = self.stats["loss_perturbed"] - float(self.last_loss)

    def _before_base_step(self) -> None:
        self._logit_grad = None

    def _describe(self) -> str:
        return f"rho={self.param_groups[0]['rho']}, precondition={self.precondition}"


class SAM(_SharpnessAware):
    """Sharpness-aware minimisation: the base optimizer takes ∇L(θ + e).

    ``SAM(params, base_optimizer=torch.optim.AdamW, rho=0.05, precondition=False,
    rho_warmup_steps=0, eps=1e-12, grad_clip=0.0, model=None, **base_kwargs)``; the
    closure returns (outputs, loss) from a forward pass only. See the module docstring.
    """

    num_passes = 2

    def _backward(self, k: int, outputs: torch.Tensor, loss: torch.Tensor) -> None:
        if k == 0:
            self._clean_pass(outputs, loss, keep_logit_grad=False)
        else:
            self._record_perturbed_loss(loss)
            loss.backward()


class AngleSAM(_SharpnessAware):
    """Angle-SAM: the SAM gradient's logit path and Jacobian path mixed at angle ``phi``.

    ``phi`` = 0 is Functional-SAM, π/2 the logit path alone, π/4 SAM to first order in ρ.
    Three passes per step unless sin φ = 0. Other arguments as ``SAM``.
    """

    def __init__(self, params, base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
                 rho: float = 0.05, *, phi: float = math.pi / 4, **kwargs: Any):
        if not math.isfinite(phi):
            raise ValueError(f"phi must be a finite angle in radians, got {phi}")
        super().__init__(params, base_optimizer, rho, **kwargs)
        self.phi = float(phi)
        self._sin, self._cos = math.sin(self.phi), math.cos(self.phi)
        if abs(self._sin) < _NEGLIGIBLE:
            self._sin = 0.0
        if abs(self._cos) < _NEGLIGIBLE:
            self._cos = 0.0
        self._perturbed_logit_grad: torch.Tensor | None = None

    @property
    def num_passes(self) -> int:
        return 2 if self._sin == 0.0 else 3

    def _backward(self, k: int, outputs: torch.Tensor, loss: torch.Tensor) -> None:
        if k == 0:
            self._clean_pass(outputs, loss, keep_logit_grad=True)
        elif k == 1:
            self._record_perturbed_loss(loss)
            if self._sin != 0.0:
                # ∂L/∂z at θ + e, for the logit path's backward at θ in the next pass.
                self._perturbed_logit_grad = torch.autograd.grad(
                    loss, outputs, retain_graph=self._cos != 0.0)[0].detach()
            if self._cos != 0.0:
                outputs.backward(self._logit_grad * self._cos)  # cos φ · J(θ + e)ᵀ ∇_z L(θ)
        else:
            # Back at θ: sin φ · J(θ)ᵀ∇_zL(θ + e) + (1 − sin φ − cos φ) · g, one backward.
            seed = self._perturbed_logit_grad * self._sin
            rest = 1.0 - self._sin - self._cos
            if rest != 0.0:
                seed = seed + self._logit_grad * rest
            outputs.backward(seed)
            self._perturbed_logit_grad = None

    def _before_base_step(self) -> None:
        super()._before_base_step()
        self._perturbed_logit_grad = None

    def _describe(self) -> str:
        return f"{super()._describe()}, phi={self.phi:.4g}"


class FunctionalSAM(AngleSAM):
    """Functional-SAM: the base optimizer takes J(θ + e)ᵀ ∇_z L(θ), the clean loss-to-logit
    gradient through the perturbed Jacobian. Same cost as SAM; arguments as ``SAM``."""

    def __init__(self, params, base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
                 rho: float = 0.05, **kwargs: Any):
        if "phi" in kwargs:
            raise TypeError("FunctionalSAM is AngleSAM at phi=0; use AngleSAM to choose another angle")
        super().__init__(params, base_optimizer, rho, phi=0.0, **kwargs)

    def _describe(self) -> str:
        return _SharpnessAware._describe(self)
