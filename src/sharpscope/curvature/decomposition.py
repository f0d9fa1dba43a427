"""The sharpness-gradient decomposition: which part of the Hessian moves the SAM gradient.

SAM's extra gradient term is, to first order in ρ, ρ·H·ε* with ε* = g/‖g‖. Splitting
H = H_G + H_F (Gauss–Newton / logit part and functional part) splits it into
δ_logit = H_G·ε* and δ_func = H_F·ε*, δ = δ_logit + δ_func, and

    τ_logit = ‖δ_logit‖²/‖δ‖²,  τ_func = ‖δ_func‖²/‖δ‖²,  τ_cross = 2⟨δ_logit, δ_func⟩/‖δ‖²,

which sum to 1. τ_logit ≈ 1 means SAM mostly penalises the logit (loss-curvature) path,
which is the diagnosis for why SAM helps little on language models; Functional-SAM keeps
only the functional part. Cost: one forward and backward per batch, then one H·v and
one G·v on the kept graphs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..tensors import vectors as vec
from .products import GGNOperator

__all__ = ["DecompositionResult", "sharpness_gradient_decomposition"]


@dataclass
class DecompositionResult:
    tau_logit: float
    tau_func: float
    tau_cross: float
    grad_norm: float
    delta_norm: float
    logit_norm: float
    func_norm: float
    #: ε*ᵀHε* and ε*ᵀH_Gε*: the curvature along the normalised gradient, and its GGN part.
    curvature: float
    ggn_curvature: float


def sharpness_gradient_decomposition(
    model: torch.nn.Module,
    forward_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    batches: Any,
    *,
    output_loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    **options,
) -> DecompositionResult:
    """τ_logit, τ_func, τ_cross at the current θ (see the module doc).

    ``forward_fn(model, batch)`` returns the logits; ``output_loss_fn(logits, batch)``
    the mean loss (cross-entropy by default). ``options``: mode, autocast, distributed,
    process_group. The model is left exactly as it was.
    """
    with GGNOperator(model, forward_fn, batches, output_loss_fn=output_loss_fn, **options) as op:
        g = op.gradient()
        g_norm = vec.norm(g)
        if g_norm == 0.0 or not math.isfinite(g_norm):
            raise ValueError(
                f"the gradient norm is {g_norm}: the decomposition needs a finite, nonzero gradient"
            )
        eps = vec.scale(g, 1.0 / g_norm)
        delta = op.hessian_matvec(eps)
        logit = op.matvec(eps)
    func = vec.sub(delta, logit)
    dd = vec.dot(delta, delta)
    if dd == 0.0:
        nan = math.nan
        return DecompositionResult(nan, nan, nan, g_norm, 0.0, vec.norm(logit), vec.norm(func), 0.0, vec.dot(eps, logit))
    ll, ff, lf = vec.dot(logit, logit), vec.dot(func, func), vec.dot(logit, func)
    return DecompositionResult(
        tau_logit=ll / dd,
        tau_func=ff / dd,
        tau_cross=2.0 * lf / dd,
        grad_norm=g_norm,
        delta_norm=math.sqrt(dd),
        logit_norm=math.sqrt(ll),
        func_norm=math.sqrt(ff),
        curvature=vec.dot(eps, delta),
        ggn_curvature=vec.dot(eps, logit),
    )
