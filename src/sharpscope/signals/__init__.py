"""Online readings of the measurement stream, for use while training (numpy only)."""

from .phase import PHASES, PhaseReader
from .warmup import AutoWarmup, WarmupSettings, check_warmup_settings

__all__ = ["PHASES", "AutoWarmup", "PhaseReader", "WarmupSettings", "check_warmup_settings"]
