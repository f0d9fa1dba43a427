"""Preconditioned sharpness of Adam-family optimizers, read from the optimizer's state.

Adam steps θ ← θ − η·m̂/(√v̂ + ε), so the curvature that decides its stability is that of
P⁻¹H with P = diag(√v̂ + ε), whose eigenvalues equal those of the symmetric
P^{-1/2}·H·P^{-1/2}. We report λ_max of the latter and compare it with the stability
threshold of Adam with momentum β1 (exponential moving average of gradients),
(2 + 2β1) / ((1 − β1)·η), which is 38/η for β1 = 0.9.

Which corrections enter P: v̂ = v / (1 − β2^t) is the bias-corrected second moment
(``exp_avg_sq``, or ``max_exp_avg_sq`` with amsgrad) exactly as torch's Adam/AdamW
compute their denominator, with ε added after the square root. The first-moment bias
correction 1/(1 − β1^t) scales the step, not the geometry: it is not in P, and the
threshold uses the group's nominal lr (the correction tends to 1 after a few hundred steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..tensors.objective import LossFn
from ..tensors.state import trainable_parameters, unwrap_model
from .eigen import DEFAULT_TOL, lanczos
from .products import HessianOperator

__all__ = ["PreconditionedSharpnessResult", "adam_preconditioner", "preconditioned_sharpness"]


@dataclass
class PreconditionedSharpnessResult:
    """``value`` = λ_max(P^{-1/2} H P^{-1/2}); ``threshold`` = (2 + 2β1)/((1 − β1)·lr);
    ``ratio`` = value / threshold (above 1: Adam is past its stability edge)."""

    value: float
    values: list[float]
    threshold: float
    lr: float
    beta1: float
    matvecs: int
    converged: bool

    @property
    def ratio(self) -> float:
        return self.value / self.threshold


def _step_count(step) -> float:
    return float(step.item()) if isinstance(step, torch.Tensor) else float(step)


def adam_preconditioner(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """P = √v̂ + ε per trainable parameter, from an Adam-family optimizer's state.

    A parameter Adam does not move (outside every group, or without state because it
    never had a gradient) gets P = +inf: P^{-1/2} = 0 removes it from the operator, as
    it is absent from the optimizer's dynamics.
    """
    params = trainable_parameters(model)
    group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
    out = []
    any_state = False
    for p in params:
        group = group_of.get(p)
        state = optimizer.state.get(p, {})
        key = "max_exp_avg_sq" if group is not None and group.get("amsgrad") else "exp_avg_sq"
        if group is not None and "betas" not in group:
            raise ValueError(
                "preconditioned sharpness needs an Adam-family optimizer (Adam, AdamW); "
                f"{type(optimizer).__name__} has no betas or second-moment state"
            )
        if group is None or key not in state or "step" not in state or _step_count(state["step"]) < 1:
            out.append(torch.full_like(p, math.inf))
            continue
        any_state = True
        beta2 = group["betas"][1]
        v_hat = state[key].detach().double() / (1.0 - beta2 ** _step_count(state["step"]))
        out.append((v_hat.sqrt() + group["eps"]).to(device=p.device, dtype=p.dtype))
    if not any_state:
        raise ValueError(
            "the optimizer has no second-moment state yet; take at least one optimizer "
            "step before measuring preconditioned sharpness"
        )
    return out


def preconditioned_sharpness(
    model: torch.nn.Module,
    loss_fn: LossFn,
    batches: Any,
    optimizer: torch.optim.Optimizer,
    *,
    k: int = 1,
    tol: float = DEFAULT_TOL,
    max_iter: int = 100,
    seed: int = 0,
    product: str = "auto",
    **options,
) -> PreconditionedSharpnessResult:
    """λ_max of the Adam-preconditioned Hessian and Adam's stability threshold.

    Reads (never changes) the optimizer's state; the lr and β1 of the first parameter
    group set the threshold. The model is left exactly as it was.
    """
    precond = adam_preconditioner(unwrap_model(model), optimizer)
    inv_sqrt = [p.double().rsqrt().to(p.dtype) for p in precond]
    group = optimizer.param_groups[0]
    lr = float(group["lr"].item() if isinstance(group["lr"], torch.Tensor) else group["lr"])
    beta1 = float(group["betas"][0])
    with HessianOperator(model, loss_fn, batches, method=product, seed=seed, **options) as op:

        def matvec(u):
            scaled = [d * x for d, x in zip(inv_sqrt, u)]
            return [d * h for d, h in zip(inv_sqrt, op.matvec(scaled))]

        eig = lanczos(matvec, op.params, k, tol=tol, max_iter=max_iter, seed=seed)
    return PreconditionedSharpnessResult(
        value=eig.values[0], values=eig.values, threshold=(2 + 2 * beta1) / ((1 - beta1) * lr),
        lr=lr, beta1=beta1, matvecs=eig.matvecs, converged=eig.converged,
    )
