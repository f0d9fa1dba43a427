"""The live phase reader against trajectories of known shape and the offline detector."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sharpscope.analysis.phases import detect_three_phase
from sharpscope.signals import PHASES, PhaseReader


def three_phase(t):
    """λ rises to 100 at t = 0.3, decays to 40 by t = 0.6, then stays there."""
    rise = 10 + 90 * np.clip(t / 0.3, 0, 1)
    decay = np.where(t > 0.3, 60 * np.clip((t - 0.3) / 0.3, 0, 1), 0)
    return rise - decay


def feed(t, lam, reader=None):
    reader = reader or PhaseReader()
    return reader, [reader.update(ti, 2.0 / li if li > 0 else 0.0) for ti, li in zip(t, lam)]


def test_reader_follows_rise_decay_plateau_in_order():
    t = np.linspace(0, 1, 100)
    _, readings = feed(t, three_phase(t))
    phases = [r.phase for r in readings]
    # each phase appears, in this order, and nothing comes back after the plateau
    firsts = [phases.index(p) for p in ("rise", "decay", "plateau")]
    assert firsts == sorted(firsts)
    assert phases[:9] == ["undecided"] * 9  # fewer than min_points readings
    assert phases[-1] == "plateau" and "rise" not in phases[firsts[2]:]
    last = readings[-1]
    assert last.peak == pytest.approx(100.0, rel=0.05)  # a 5-reading harmonic mean at a sharp corner
    assert 0.25 <= last.t_peak <= 0.35
    # the plateau is dated from where its window starts; offline agrees it is three phases
    assert 0.5 <= last.plateau_since <= 0.85  # within flat_tol of the drop from t ≈ 0.53
    assert detect_three_phase(t, 2.0 / three_phase(t), reciprocal=2.0).preserved
    assert last.as_metrics()["phase/code"] == PHASES.index("plateau")


def test_a_run_still_rising_reads_rise_and_a_flat_one_undecided():
    t = np.linspace(0, 1, 60)
    _, rising = feed(t, 10 + 90 * t)
    assert rising[-1].phase == "rise" and math.isnan(rising[-1].plateau_since)
    _, flat = feed(t, np.full_like(t, 50.0))
    assert {r.phase for r in flat} == {"undecided"}


def test_uphill_updates_count_as_sharp_and_missing_ones_are_skipped():
    t = np.linspace(0, 1, 100)
    lam = three_phase(t)
    reader = PhaseReader()
    for ti, li in zip(t, lam):
        reader.update(ti, 2.0 / li)
        reader.update(ti, math.nan)  # a failed measurement without a reading
    assert len(reader.eta) == 100
    # a window of not_descent (η_c = 0) during the rise reads as the sharpest point, capped
    r2 = PhaseReader()
    readings = [r2.update(ti, 0.0 if 0.25 < ti < 0.32 else 2.0 / li) for ti, li in zip(t, lam)]
    assert all(math.isfinite(r.peak) for r in readings if r.phase != "undecided")
    assert readings[-1].phase == "plateau"


def test_state_dict_resumes_the_same_readings():
    t = np.linspace(0, 1, 80)
    lam = three_phase(t)
    whole, full = feed(t, lam)
    first, _ = feed(t[:37], lam[:37])
    resumed = PhaseReader()
    resumed.load_state_dict(first.state_dict())
    _, rest = feed(t[37:], lam[37:], resumed)
    assert [r.as_metrics() for r in rest] == [r.as_metrics() for r in full[37:]]


def test_signals_do_not_import_torch():
    # The reader runs beside any training loop, the HF/Lightning callbacks included, and
    # in analysis replays: numpy only.
    import subprocess
    import sys

    code = "import sys, sharpscope.signals; assert 'torch' not in sys.modules, 'torch was imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_trainer_logs_the_live_phase_reading_resume_exactly(tmp_path):
    # The trainer's monitor knows the run's length, so every measurement carries the live
    # reading; replaying the logged η_c through a fresh reader gives the same phases, and a
    # resumed run continues the reader's state (its rows equal the uninterrupted run's).
    import json

    from sharpscope.cli import main
    from sharpscope.metrics import ETA_C, FAILED_PREFIX, PHASE_CODE

    tiny = ["progress=false", "model.preset=nano", "model.block_size=32", "data.batch_size=4",
            "data.sources=arithmetic,code", "data.max_bytes=200000", "eval.every=0", "eval.batches=1",
            "eval.arithmetic_problems=0", "schedule.warmup_steps=3", "monitor.every=2"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["train", "--out", str(whole), "--steps", "30", *tiny]) == 0
    assert main(["train", "--out", str(part), "--steps", "30", *tiny, "checkpoint.every=14", "checkpoint.keep=3"]) == 0
    rows = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if PHASE_CODE in r]
    assert len(measured) == 15 and {r[PHASE_CODE] for r in measured[:9]} == {0.0}
    reader = PhaseReader()
    for r in measured:
        eta = r[ETA_C] if r.get(ETA_C) is not None else (0.0 if r.get(FAILED_PREFIX + "not_descent") else math.nan)
        assert reader.update((r["step"] - 1) / 30, eta).code == r[PHASE_CODE]
    # resume from the step-14 checkpoint of the second run, after cutting its later rows
    lines = (part / "metrics.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["step"] <= 14]
    (part / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    import shutil

    for ck in sorted((part / "checkpoints").glob("step*")):
        if int(ck.name.removeprefix("step")) > 14:
            shutil.rmtree(ck)
    assert main(["train", "--out", str(part), "--steps", "30", *tiny, "checkpoint.every=14", "checkpoint.keep=3", "--resume"]) == 0
    resumed = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    phase = lambda rs: [(r["step"], r.get(PHASE_CODE), r.get("phase/smoothed")) for r in rs if PHASE_CODE in r]
    assert phase(resumed) == phase(rows)
