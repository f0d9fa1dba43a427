"""Vectors in parameter space, kept as lists of tensors shaped like the parameters.

Parameters may live on several devices and in several dtypes, so nothing is flattened:
every reduction is done per tensor and summed on the host in float64.
"""

from __future__ import annotations

from typing import Sequence

import torch

Vector = list[torch.Tensor]


def dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    total = 0.0
    for x, y in zip(a, b, strict=True):
        total += float(torch.sum(x.double() * y.double()))
    return total


def norm(a: Sequence[torch.Tensor]) -> float:
    return dot(a, a) ** 0.5


def scale(a: Sequence[torch.Tensor], c: float) -> Vector:
    return [x * c for x in a]


def axpy(c: float, x: Sequence[torch.Tensor], y: Sequence[torch.Tensor]) -> Vector:
    """c·x + y as a new vector."""
    return [yi.add(xi, alpha=c) for xi, yi in zip(x, y, strict=True)]


def sub(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> Vector:
    return [x - y for x, y in zip(a, b, strict=True)]


def zeros_like(like: Sequence[torch.Tensor]) -> Vector:
    return [torch.zeros_like(x) for x in like]


def numel(like: Sequence[torch.Tensor]) -> int:
    return sum(x.numel() for x in like)


def is_finite(a: Sequence[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(x).all()) for x in a)


def random_like(
    like: Sequence[torch.Tensor], generator: torch.Generator, kind: str = "rademacher"
) -> Vector:
    """A random vector drawn on the CPU from ``generator`` (so every rank and every device
    layout draws the same numbers), then moved to each parameter's device and dtype."""
    out = []
    for x in like:
        if kind == "rademacher":
            r = torch.randint(0, 2, x.shape, generator=generator, dtype=torch.int8)
            r = r.to(torch.float64).mul_(2).sub_(1)
        elif kind == "normal":
            r = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        else:
            raise ValueError(f"unknown random vector kind {kind!r}")
        out.append(r.to(device=x.device, dtype=x.dtype))
    return out


def check_aligned(vector: Sequence[torch.Tensor], params: Sequence[torch.Tensor], what: str) -> Vector:
    """Validate that ``vector`` matches the trainable parameters tensor by tensor."""
    vector = list(vector)
    if len(vector) != len(params):
        raise ValueError(
            f"{what} has {len(vector)} tensors but the model has {len(params)} trainable "
            "parameters; give one tensor per parameter with requires_grad, in "
            "model.parameters() order"
        )
    out = []
    for i, (v, p) in enumerate(zip(vector, params)):
        if not isinstance(v, torch.Tensor) or v.shape != p.shape:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(
                f"{what}[{i}] has shape {shape} but parameter {i} has shape {tuple(p.shape)}"
            )
        out.append(v.detach().to(device=p.device, dtype=p.dtype))
    return out
