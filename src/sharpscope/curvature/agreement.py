"""Gradient agreement across data sources: do the sources pull the parameters the same way?

For sources s with mean loss L_s on their own batches, g_s = ∇L_s(θ); the agreement of two
sources is cos(g_a, g_b) = ⟨g_a, g_b⟩ / (‖g_a‖‖g_b‖). Nexus is built to raise it; plain
pretraining can reach the same loss with the sources' gradients nearly orthogonal. One
gradient per source (a forward and backward per batch), read with the same state guard
as every measure: nothing about the model or its gradients changes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from ..tensors.objective import LossFn
from ..tensors.vectors import dot
from .critical import update_direction

__all__ = ["GradientAgreement", "gradient_agreement"]


@dataclass
class GradientAgreement:
    """``norms[s]`` = ‖g_s‖; ``cosines[(a, b)]`` = cos(g_a, g_b) for a < b (sorted names);
    ``mean_cosine`` = their mean (NaN with fewer than two sources)."""

    norms: dict[str, float]
    cosines: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def mean_cosine(self) -> float:
        return sum(self.cosines.values()) / len(self.cosines) if self.cosines else math.nan

    def as_metrics(self, prefix: str = "grad_cosine") -> dict[str, float]:
        """Flat metric names for a run's metrics.jsonl: ``grad_cosine/a~b``, ``grad_cosine/mean``."""
        out = {f"{prefix}/{a}~{b}": c for (a, b), c in self.cosines.items()}
        if self.cosines:
            out[f"{prefix}/mean"] = self.mean_cosine
        return out


def gradient_agreement(model: torch.nn.Module, loss_fn: LossFn, batches_by_source: Mapping[str, Any], *,
                       mode: str | None = "eval", distributed: bool | str = "auto", process_group=None,
                       seed: int = 0) -> GradientAgreement:
    """Pairwise cosine similarity of the per-source gradients at the current parameters.

    ``batches_by_source`` maps a source name to a batch or a list of batches (the loss is
    their mean). ``mode="eval"`` turns dropout off so the gradients are deterministic.
    """
    if not batches_by_source:
        raise ValueError("gradient_agreement needs at least one source")
    names = sorted(batches_by_source)
    grads = {name: update_direction(model, loss_fn, batches_by_source[name], mode=mode, distributed=distributed,
                                    process_group=process_group, seed=seed) for name in names}
    norms = {name: math.sqrt(dot(g, g)) for name, g in grads.items()}
    cosines = {}
    for a, b in itertools.combinations(names, 2):
        denominator = norms[a] * norms[b]
        cosines[(a, b)] = dot(grads[a], grads[b]) / denominator if denominator > 0 else math.nan
    return GradientAgreement(norms=norms, cosines=cosines)
