"""Claim: the whole simulated study runs in under 2 s without figures, under 30 s with
figures and the HTML report, on a 2-core CPU machine.

Prints each stage's time, the number of trajectories computed, and the ratio of the total
to its budget (below 1.0 means the claim holds on this machine today).
"""

import tempfile
import time
from pathlib import Path

from sharpscope.report.build import write_report
from sharpscope.simulation import SimulationConfig
from sharpscope.simulation.study import n_trajectories, plan_study, write_study


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def main() -> None:
    cfg = SimulationConfig()
    planned, t_plan = timed(plan_study, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "study"
        _, t_write = timed(write_study, cfg, study)
        _, t_tables = timed(write_report, study, Path(tmp) / "tables-only", figures=False)
        _, t_full = timed(write_report, study, Path(tmp) / "full", figures=True)
    runs, traj = len(planned), n_trajectories(planned)
    no_fig = t_write + t_tables  # write_study simulates again: the end-to-end cost a user pays
    with_fig = t_write + t_full
    print(f"runs {runs}, trajectories computed {traj} (200 checkpoints each)")
    print(f"simulate (in memory)          {t_plan:7.3f} s")
    print(f"simulate + write runs         {t_write:7.3f} s")
    print(f"analysis, tables + summary    {t_tables:7.3f} s")
    print(f"analysis + 12 figures + HTML  {t_full:7.3f} s")
    print(f"study without figures         {no_fig:7.3f} s   ratio to 2 s budget  {no_fig / 2.0:.2f}")
    print(f"study with figures and report {with_fig:7.3f} s   ratio to 30 s budget {with_fig / 30.0:.2f}")


if __name__ == "__main__":
    main()
