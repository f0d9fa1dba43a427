"""Online readings of the measurement stream, for use while training (numpy only)."""

from .phase import PHASES, PhaseReader

__all__ = ["PHASES", "PhaseReader"]
