"""The parametric simulation of sharpness across scales (numpy only, no torch)."""

from .config import SimulationConfig
from .study import plan_study, write_study
from .trajectories import simulate_run

__all__ = ["SimulationConfig", "plan_study", "write_study", "simulate_run"]
