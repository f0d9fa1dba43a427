"""Studies built from training runs: the measured grid (grid_study), the data-mix advisor
(mix), the AdamW/Nexus diagnostics (nexus, minima) and what they share (plan). They sit
above training and below report: figures are drawn by callables the caller hands in."""
