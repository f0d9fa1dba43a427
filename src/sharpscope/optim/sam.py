"""Sharpness-aware minimisation: SAM, Functional-SAM and Angle-SAM, optionally preconditioned.

All three start the same way. At θ, with g = ∇L(θ), the ascent direction is

    ε* = g / (‖g‖ + norm_eps)                   (global norm over all parameters)
    e  = ρ · ε*                                 (plain)
    e  = ρ · M⁻¹g / (‖M⁻¹g‖ + norm_eps)         (precondition=True)

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

φ = 0 is Functional-SAM; φ = π/2 keeps only the logit path; φ = π/4 gives g + (A + B)/√2
(A, B the two bracketed corrections), SAM's first-order correction at 1/√2 of its length,
i.e. SAM at radius ρ/√2 to first order (SAM itself is g + A + B + O(ρ²)). Costs (forward+backward passes per step): SAM and Functional-SAM 2;
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

from ._wrapper import PassOptimizer, global_norm

__all__ = ["SAM", "FunctionalSAM", "AngleSAM"]

_NEGLIGIBLE = 1e-12  # |sin φ| or |cos φ| below this drops that path (cos(π/2) is 6e-17 in floats)


class _SharpnessAware(PassOptimizer):
    """Perturbation shared by the SAM family; subclasses say what pass 1 (and 2) compute."""

    def __init__(self, params, base_optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
                 rho: float = 0.05, *, precondition: bool = False, rho_warmup_steps: int = 0, norm_eps: float = 1e-12,
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
        self.norm_eps = float(norm_eps)
        self._logit_grad: torch.Tensor | None = None
        self.logit_grad_bytes = 0

    def rho_factor(self) -> float:
        """Fraction of ρ used at this step: a linear warm-up from 1/W to 1 over W steps."""
        if self.rho_warmup_steps <= 0:
            return 1.0
        return min(1.0, (self.steps + 1) / self.rho_warmup_steps)

    def _adam_denominators(self, params: list[torch.Tensor]) -> list[torch.Tensor | None] | None:
        """M = √(v/(1 − β2^t)) + ε per parameter, as the base Adam computes its denominator
        (``max_exp_avg_sq`` with amsgrad); None for a parameter without state, and None
        overall before the base optimizer's first step."""
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        out, any_state = [], False
        for p in params:
            group, state = group_of[p], self.base.state.get(p, {})
            key = "max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq"
            if key not in state or "step" not in state:
                out.append(None)
                continue
            step = state["step"]
            step = float(step.item()) if isinstance(step, torch.Tensor) else float(step)
            if step < 1:
                out.append(None)
                continue
            any_state = True
            out.append(state[key].div(1.0 - group["betas"][1] ** step).sqrt_().add_(group["eps"]))
        return out if any_state else None

    @torch.no_grad()
    def _perturb(self) -> None:
        params = self._params()
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        grad_norm = global_norm(grads)
        direction = grads
        denominators = self._adam_denominators(params) if self.precondition else None
        if denominators is not None:
            # A parameter Adam has no state for yet does not move: M⁻¹ is taken as 0 there.
            direction = [g / m if m is not None else torch.zeros_like(g) for g, m in zip(grads, denominators)]
        scale = self.rho_factor() / (global_norm(direction) + self.norm_eps)
        start = 0
        for group in self.param_groups:  # self._params() lists the groups' parameters in this order
            count = sum(1 for p in group["params"] if p.requires_grad)
            if count:
                torch._foreach_add_(params[start:start + count],
                                    torch._foreach_mul(direction[start:start + count], scale * group["rho"]))
            start += count
        self._moved = True
        self._stats = {"grad_norm_clean": grad_norm, "rho": self.rho_factor() * self.param_groups[0]["rho"],
                       "preconditioned": float(denominators is not None)}

    def _clean_pass(self, outputs: torch.Tensor, loss: torch.Tensor, keep_logit_grad: bool) -> None:
        if keep_logit_grad:
            # ∂L/∂z at θ, kept (detached) for the perturbed pass; then g = ∇L(θ) as usual.
            self._logit_grad = torch.autograd.grad(loss, outputs, retain_graph=True)[0].detach()
            self.logit_grad_bytes = self._logit_grad.numel() * self._logit_grad.element_size()  # held until the step ends
        loss.backward()
        self._perturb()
        self._zero_grads()

    def _record_perturbed_loss(self, loss: torch.Tensor) -> None:
        self._stats["loss_perturbed"] = loss.detach()
        self._stats["loss_increase"] = loss.detach() - self.last_loss

    def _before_base_step(self) -> None:
        self._logit_grad = None

    def _describe(self) -> str:
        return f"rho={self.param_groups[0]['rho']}, precondition={self.precondition}"


class SAM(_SharpnessAware):
    """Sharpness-aware minimisation: the base optimizer takes ∇L(θ + e).

    ``SAM(params, base_optimizer=torch.optim.AdamW, rho=0.05, precondition=False,
    rho_warmup_steps=0, norm_eps=1e-12, grad_clip=0.0, model=None, **base_kwargs)``
    (``eps``, ``lr``, ``betas``, ``weight_decay`` go to the base optimizer); the
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

    ``phi`` = 0 is Functional-SAM, π/2 the logit path alone, π/4 SAM at radius ρ/√2 to
    first order in ρ.
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
            if self.num_passes == 3:
                self._restore_origin()  # the logit path's backward is taken at θ
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
