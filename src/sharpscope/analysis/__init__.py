"""Analysis of studies (numpy/scipy only): fits, phases, correlations, bounds, prediction."""

from .fits import ScalingLaw, line_fit, pearson
from .phases import detect_three_phase, final_value, peak_value, phase_means
from .runset import analyze_any
from .study import AnalysisOptions, StudyAnalysis, analyze_runs

__all__ = ["ScalingLaw", "line_fit", "pearson", "detect_three_phase", "final_value", "peak_value",
           "phase_means", "AnalysisOptions", "StudyAnalysis", "analyze_runs", "analyze_any"]
