"""sharpscope: measure, steer and understand loss-landscape sharpness in LM training.

The curvature API is re-exported here but imported lazily, so ``import sharpscope``
(and the numpy-only simulation and analysis layers) never pulls in torch.
"""

__version__ = "0.1.0"

_CURVATURE_EXPORTS = (
    "CriticalSharpnessResult",
    "DirectionCapture",
    "GGNOperator",
    "HessianOperator",
    "NonFiniteLossError",
    "SharpnessMonitor",
    "critical_sharpness",
    "ggn_vector_product",
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "preconditioned_sharpness",
    "relative_critical_sharpness",
    "sharpness_gradient_decomposition",
    "update_direction",
)

__all__ = ["__version__", *_CURVATURE_EXPORTS]


def __getattr__(name: str):
    if name in _CURVATURE_EXPORTS:
        from . import curvature

        value = getattr(curvature, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sharpscope' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
