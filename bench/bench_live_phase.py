"""Claim: the live phase reading (signals.PhaseReader, causal) agrees with the offline
three-phase detector (analysis.phases.detect_three_phase on the whole run, η space), and
says how much later than the offline t_plateau it can signal the plateau.

Every run of the given folders that logs critical sharpness from a line search is
replayed measurement by measurement through the reader; its phase at the end of the run
and the t at which its final plateau began are compared with the offline result.

    python bench/bench_live_phase.py STUDY_OR_RUNS_FOLDER [...]
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from sharpscope.analysis.etaspace import eta_series
from sharpscope.analysis.phases import detect_three_phase
from sharpscope.metrics import ETA_C
from sharpscope.runs import read_study
from sharpscope.signals import PhaseReader


def replay(t: np.ndarray, eta: np.ndarray) -> tuple[str, float, float, list[str]]:
    """(phase at the end, t the final plateau began, t the reader first said so, phases)."""
    reader = PhaseReader()
    phases = []
    reading = None
    signalled = math.nan
    for ti, ei in zip(t, eta):
        reading = reader.update(float(ti), float(ei))
        if reading.phase == "plateau" and (not phases or phases[-1] != "plateau"):
            signalled = float(ti)
        phases.append(reading.phase)
    if reading is None:
        return "undecided", math.nan, math.nan, phases
    return reading.phase, reading.plateau_since, signalled if reading.phase == "plateau" else math.nan, phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+")
    args = parser.parse_args()
    rows = []
    for folder in args.folders:
        for run in read_study(folder):
            series = eta_series(run)
            if series is not None:
                t, eta = series.t, series.eta
            else:  # a simulated run: η_c = 2/λ_c of its closed-form trajectory
                t, eta = run.series(ETA_C)
            if t.size == 0:
                continue
            offline = detect_three_phase(t, eta, reciprocal=2.0)
            final, since, signalled, phases = replay(t, eta)
            rows.append((run.name, offline, final, since, signalled, phases))
    agree = sum((r[1].preserved and r[2] == "plateau") or (not r[1].preserved and r[2] != "plateau") for r in rows)
    both = [r for r in rows if r[1].preserved and r[2] == "plateau"]
    print(f"{len(rows)} runs; final phase agrees with the offline detector on {agree}/{len(rows)} "
          f"(offline three phases: {sum(r[1].preserved for r in rows)}, live plateau at the end: "
          f"{sum(r[2] == 'plateau' for r in rows)})")
    if both:
        start = [r[3] - r[1].t_plateau for r in both]
        lag = [r[4] - r[1].t_plateau for r in both]
        print(f"where both find a plateau ({len(both)} runs): the live plateau starts at offline t_plateau "
              f"{np.median(start):+.3f} (median; range {min(start):+.3f} … {max(start):+.3f}) and is signalled at "
              f"{np.median(lag):+.3f} ({min(lag):+.3f} … {max(lag):+.3f}), in fractions of the run")
    print("| run | offline | live at the end | live plateau since | signalled at | phases seen (share of readings) |")
    print("|---|---|---|---|---|---|")
    for name, offline, final, since, signalled, phases in rows:
        shares = ", ".join(f"{p} {phases.count(p) / len(phases):.0%}" for p in ("undecided", "rise", "decay", "plateau")
                           if phases.count(p))
        verdict = "three phases" if offline.preserved else offline.reason
        print(f"| {name} | {verdict} | {final} | {since:.2f} | {signalled:.2f} | {shares} |")


if __name__ == "__main__":
    main()
