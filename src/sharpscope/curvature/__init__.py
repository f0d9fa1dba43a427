"""Curvature measurement: critical sharpness and exact references.

* :func:`critical_sharpness`, :func:`relative_critical_sharpness`: forward-only line
  search along an update direction; :class:`DirectionCapture` and
  :class:`SharpnessMonitor` get that direction from any optimizer.
* :class:`HessianOperator`, :class:`GGNOperator`: H·v and G·v products.
* :func:`hessian_eigenvalues` (Lanczos; power iteration baseline), :func:`hessian_trace`
  (Hutchinson, Hutch++), :func:`preconditioned_sharpness` (Adam),
  :func:`sharpness_gradient_decomposition` (τ_logit, τ_func, τ_cross).

Every public call leaves the model's parameters, buffers, grads, modes and the global RNG
states exactly as it found them. See docs/measures.md.
"""

from .capture import DirectionCapture
from .critical import (
    CriticalSharpnessResult,
    NonFiniteLossError,
    critical_sharpness,
    relative_critical_sharpness,
    update_direction,
)
from .decomposition import DecompositionResult, sharpness_gradient_decomposition
from .eigen import EigenResult, hessian_eigenvalues, lanczos, power_iteration
from .monitor import SharpnessMonitor, exact_references
from .preconditioned import (
    PreconditionedSharpnessResult,
    adam_preconditioner,
    preconditioned_sharpness,
)
from .products import (
    GGNOperator,
    HessianOperator,
    cross_entropy_on_outputs,
    ggn_vector_product,
    hessian_vector_product,
)
from .trace import TraceResult, hessian_trace, hutchinson, hutchpp

__all__ = [
    "CriticalSharpnessResult",
    "DecompositionResult",
    "DirectionCapture",
    "EigenResult",
    "GGNOperator",
    "HessianOperator",
    "NonFiniteLossError",
    "PreconditionedSharpnessResult",
    "SharpnessMonitor",
    "TraceResult",
    "adam_preconditioner",
    "critical_sharpness",
    "cross_entropy_on_outputs",
    "exact_references",
    "ggn_vector_product",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "power_iteration",
    "preconditioned_sharpness",
    "relative_critical_sharpness",
    "sharpness_gradient_decomposition",
    "update_direction",
]
