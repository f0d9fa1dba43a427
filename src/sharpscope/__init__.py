"""sharpscope: measure, steer and understand loss-landscape sharpness in LM training."""

__version__ = "0.1.0"
