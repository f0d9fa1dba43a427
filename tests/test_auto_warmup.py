"""The automatic warmup: the controller's arithmetic on hand-made measurement streams (no
model), and the trainer's schedule.warmup = "auto" (the lr it applies and logs, its cap,
the monitor's cadence while warming up, resume, the fixed default left as it was)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from support.training import final_weights, run_rows, train_one_thread
from sharpscope.metrics import ETA_C, WARMUP_CAP, WARMUP_LR, WARMUP_STEPS
from sharpscope.signals import AutoWarmup, WarmupSettings, check_warmup_settings


def warmup(total=1000, **settings) -> AutoWarmup:
    return AutoWarmup(WarmupSettings(**settings), total_steps=total)


# ---- the controller ---------------------------------------------------------------------

def test_without_readings_the_lr_grows_by_the_growth_factor_until_the_ceiling():
    w = warmup(init=0.01, growth=2.0)
    lrs = []
    step = 0
    while w.active:
        lrs.append(w.step_lr(step, ceiling=1.0))
        step += 1
    # 0.01, 0.02, ..., 0.64, then 1.28 is cut to the ceiling: warmup ends at step 7.
    assert lrs == [0.01 * 2 ** k for k in range(7)] + [1.0]
    assert w.end == 7 and w.cap is None
    with pytest.raises(RuntimeError, match="ended at step 7"):
        w.step_lr(8, ceiling=1.0)


def test_the_cap_is_target_times_an_average_of_eta_c_not_of_lambda_c():
    w = warmup(init=0.01, growth=100.0, target=0.5, smoothing=0.5)
    w.step_lr(0, ceiling=10.0)
    w.update(eta=1.0)
    w.update(eta=3.0)
    # η̄ = 0.5·1 + 0.5·3 = 2 (λ space would give 2/(0.5·2 + 0.5·2/3) = 1.5)
    assert w.eta_mean == 2.0
    assert w.step_lr(1, ceiling=10.0) == 1.0 and w.cap == 1.0  # growth allows 10: the cap binds
    # a reading near zero halves η̄ instead of collapsing it
    w.update(eta=1e-9)
    assert w.eta_mean == pytest.approx(1.0)
    assert w.step_lr(2, ceiling=10.0) == pytest.approx(0.5)
    # smoothing 0 follows the latest reading
    z = warmup(init=0.01, growth=100.0, target=0.5, smoothing=0.0)
    z.step_lr(0, ceiling=10.0)
    z.update(eta=1.0)
    z.update(eta=4.0)
    assert z.step_lr(1, ceiling=10.0) == 2.0


def test_the_growth_limit_holds_under_a_high_cap_and_the_lr_follows_a_falling_cap():
    w = warmup(init=0.01, growth=1.2, target=0.5, smoothing=0.0)
    w.step_lr(0, ceiling=1.0)
    w.update(eta=100.0)
    assert w.step_lr(1, ceiling=1.0) == pytest.approx(0.012)  # cap 50: growth binds
    w.update(eta=0.02)
    assert w.step_lr(2, ceiling=1.0) == pytest.approx(0.01)  # cap 0.01 < 0.0144
    w.update(eta=0.03)
    assert w.step_lr(3, ceiling=1.0) == pytest.approx(0.012)  # cap 0.015: growth again


def test_not_descent_and_a_nonfinite_loss_read_eta_zero_other_failures_nothing():
    w = warmup(init=0.01, growth=10.0, target=0.5, smoothing=0.5)
    w.step_lr(0, ceiling=1.0)
    w.update(eta=0.4)
    assert w.update(eta=math.nan, status="not_descent") == pytest.approx(0.2)
    assert w.update(eta=0.0, status="nonfinite") == pytest.approx(0.1)
    for status in ("no_increase", "max_evals", "zero_direction"):
        assert w.update(eta=math.nan, status=status) is None
    assert w.readings == 3 and w.eta_mean == pytest.approx(0.1)
    # a cap below the starting lr: the lr stays at its floor (a zero lr could not be measured)
    for _ in range(3):  # η̄ = 0.0125: cap 0.00625
        w.update(eta=0.0, status="not_descent")
    assert w.step_lr(1, ceiling=1.0) == pytest.approx(0.01) and w.cap < 0.01


def test_warmup_ends_when_the_lr_reaches_the_ceiling_and_readings_after_it_change_nothing():
    w = warmup(init=0.1, growth=4.0, target=1.0, smoothing=0.0)
    assert w.step_lr(0, ceiling=2.0) == pytest.approx(0.2)
    w.update(eta=10.0)
    assert w.step_lr(1, ceiling=2.0) == pytest.approx(0.8) and w.active
    w.update(eta=10.0)
    assert w.step_lr(2, ceiling=1.5) == 1.5 and w.end == 2  # a lower ceiling (wsd's decay) ends it
    assert w.update(eta=0.001) is None and w.eta_mean == 10.0
    assert not w.due(4)


def test_the_cap_is_lifted_at_max_fraction_of_the_run():
    w = warmup(total=10, init=0.1, growth=2.0, target=0.5, smoothing=0.0, max_fraction=0.3)
    w.step_lr(0, ceiling=1.0)
    w.update(eta=0.3)
    assert w.step_lr(1, ceiling=1.0) == pytest.approx(0.15) and w.cap == pytest.approx(0.15)
    assert w.step_lr(2, ceiling=1.0) == pytest.approx(0.15)
    # steps 3 on (0.3 · 10): growth alone
    assert w.step_lr(3, ceiling=1.0) == pytest.approx(0.3) and w.cap is None
    assert w.step_lr(4, ceiling=1.0) == pytest.approx(0.6)
    assert w.step_lr(5, ceiling=1.0) == 1.0 and w.end == 5


def test_cadence_while_warming_up():
    w = warmup(every=3)
    assert [s for s in range(10) if w.due(s)] == [0, 3, 6, 9]


def test_state_round_trips_through_json_and_continues_identically():
    def drive(w, start, stop):
        out = []
        for s in range(start, stop):
            if not w.active:
                break
            out.append(w.step_lr(s, ceiling=1.0))
            w.update(eta=[0.05, 0.3, math.nan, 0.2][s % 4], status="not_descent" if s % 4 == 2 else "ok")
        return out

    settings = dict(total=40, init=0.01, growth=1.3, target=0.5, smoothing=0.6)
    whole = warmup(**settings)
    expected = drive(whole, 0, 40)
    part = warmup(**settings)
    first = drive(part, 0, 7)
    resumed = warmup(**settings)
    resumed.load_state_dict(json.loads(json.dumps(part.state_dict())))
    assert resumed.state_dict() == part.state_dict()
    assert first + drive(resumed, 7, 40) == expected
    assert resumed.state_dict() == whole.state_dict()


@pytest.mark.parametrize("field, value, message", [
    ("target", 0.0, "warmup target must be a positive number"),
    ("growth", 1.0, "warmup growth must be a number above 1"),
    ("init", 1.5, "warmup init must be a number in (0, 1]"),
    ("smoothing", 1.0, "warmup smoothing must be a number in [0, 1)"),
    ("every", 0, "warmup every must be a positive integer"),
    ("max_fraction", -0.1, "warmup max_fraction must be a number in [0, 1]"),
])
def test_bad_settings_fail_in_one_line(field, value, message):
    with pytest.raises(ValueError) as info:
        check_warmup_settings(WarmupSettings(**{field: value}))
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_trainer_schedule_fields_mirror_the_controller_settings():
    import dataclasses

    from sharpscope.training.config import ScheduleConfig

    ours = {f.name.removeprefix("warmup_"): f.default for f in dataclasses.fields(ScheduleConfig)
            if f.name.startswith("warmup_") and f.name != "warmup_steps"}
    assert ours == WarmupSettings().as_dict()


# ---- the trainer ------------------------------------------------------------------------

TINY = ["progress=false", "model.preset=nano", "model.block_size=16", "data.batch_size=4",
        "data.sources=arithmetic", "data.max_bytes=50000", "eval.every=0", "eval.batches=1",
        "eval.arithmetic_problems=0", "monitor.probe_batch_size=4", "monitor.every=5"]
AUTO = ["schedule.warmup=auto", "schedule.warmup_growth=1.5", "schedule.warmup_max_fraction=0.5"]


def _config(*extra: str):
    from sharpscope.config import load_config
    from sharpscope.training.config import TrainConfig

    return load_config(TrainConfig, None, [*TINY, *extra])


def _train(out: Path, *extra: str, resume: bool = False) -> Path:
    return train_one_thread(out, [*TINY, *extra], resume=resume)


def test_auto_warmup_applies_and_logs_its_lr_under_the_cap_then_hands_over_to_the_schedule(tmp_path):
    from sharpscope.training.trainer import lr_at

    args = ["steps=24", "optim.lr=0.3", *AUTO]
    rows = run_rows(_train(tmp_path / "run", *args))[1:]
    warm = [r for r in rows if WARMUP_LR in r]
    end = next(r for r in rows if WARMUP_STEPS in r)
    w = end[WARMUP_STEPS]
    assert 0 < w < 20 and end["step"] == w + 1 and warm[-1] is end
    assert [r["step"] for r in warm] == list(range(1, w + 2))
    # every warmup step was measured (monitor.every = 5 outside it), then the monitor's cadence
    assert all(ETA_C in r for r in warm[:-1])
    assert [r["step"] for r in rows[w + 1:] if ETA_C in r] == [s + 1 for s in range(w + 1, 24) if s % 5 == 0]
    # the logged lr is the applied lr: the controller's during warmup, the schedule's after it
    assert all(r["lr"] == r[WARMUP_LR] for r in warm)
    config = _config(*args)
    assert end["lr"] == lr_at(config, w, warmup_steps=w) == 0.3  # the cosine's peak
    assert all(r["lr"] == lr_at(config, r["step"] - 1, warmup_steps=w) for r in rows[w:])
    # the cap is target·η̄, η̄ the average of the logged η_c in η space; no lr exceeds it
    # until the cap is lifted at half the run (warmup_max_fraction)
    eta_mean, capped = None, 0
    for r in warm:
        if r["step"] - 1 >= 12:
            assert WARMUP_CAP not in r
        elif eta_mean is not None:
            assert r[WARMUP_CAP] == pytest.approx(0.5 * eta_mean, rel=1e-12)
            floor = 0.01 * 0.3
            assert r["lr"] <= r[WARMUP_CAP] or r["lr"] == pytest.approx(floor)
            capped += r["lr"] == pytest.approx(r[WARMUP_CAP])
        else:
            assert WARMUP_CAP not in r and r["lr"] == pytest.approx(0.003)
        if ETA_C in r:
            eta = r[ETA_C] if r[ETA_C] is not None and math.isfinite(r[ETA_C]) else 0.0
            eta_mean = eta if eta_mean is None else 0.5 * eta_mean + 0.5 * eta
    assert capped >= 1  # at lr 0.3 the curvature, not the growth limit, set some steps' lr
    assert all(b["lr"] <= 1.5 * a["lr"] * (1 + 1e-12) for a, b in zip(warm, warm[1:]))


def test_auto_warmup_resumes_bit_identically(tmp_path):
    args = ["steps=20", "optim.lr=0.3", *AUTO, "checkpoint.every=6", "checkpoint.keep=5"]
    whole = _train(tmp_path / "whole", *args)
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    for name in ("step00000012", "step00000018", "step00000020"):
        shutil.rmtree(part / "checkpoints" / name, ignore_errors=True)
    state = json.loads((part / "checkpoints" / "step00000006" / "train_state.json").read_text())
    assert state["warmup"]["end"] is None and state["warmup"]["readings"] == 6  # mid-warmup
    _train(part, *args, resume=True)
    rows = run_rows(whole)
    assert any(WARMUP_STEPS in r for r in rows[7:])  # warmup ended after the checkpoint
    assert run_rows(part) == rows
    a, b = final_weights(part), final_weights(whole)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fixed_warmup_is_the_default_and_writes_the_run_it_always_did(tmp_path):
    from sharpscope.training.trainer import lr_at

    out = _train(tmp_path / "run", "steps=6", "schedule.warmup_steps=3", "checkpoint.every=3")
    config = json.loads((out / "config.json").read_text())
    assert sorted(config["train"]["schedule"]) == ["cycle_steps", "decay_steps", "min_ratio", "name",
                                                   "warmup_steps"]
    state = json.loads((out / "checkpoints" / "step00000006" / "train_state.json").read_text())
    assert "warmup" not in state
    rows = run_rows(out)[1:]
    assert not any(k.startswith("schedule/") for r in rows for k in r)
    cfg = _config("steps=6", "schedule.warmup_steps=3")
    assert [r["lr"] for r in rows] == [lr_at(cfg, s) for s in range(6)]
    # an old run's config.json (no warmup keys) still reads, as a fixed warmup
    from sharpscope.config import from_dict
    from sharpscope.training.config import TrainConfig

    assert from_dict(TrainConfig, config["train"]).schedule.warmup == "fixed"


@pytest.mark.parametrize("args, message", [
    (["schedule.warmup=linear"], "schedule.warmup must be one of fixed, auto, got 'linear'"),
    (["schedule.warmup=auto", "monitor.every=0"], "schedule.warmup=auto reads the monitor's measurements"),
    (["schedule.warmup=auto", "schedule.warmup_growth=0.9"], "schedule.warmup_growth must be a number above 1"),
    (["schedule.warmup=auto", "schedule.warmup_max_fraction=2"],
     "schedule.warmup_max_fraction must be a number in [0, 1]"),
    # checked with a fixed warmup too: the bad value fails before the run that turns auto on
    (["schedule.warmup_target=0"], "schedule.warmup_target must be"),
])
def test_bad_warmup_options_fail_in_one_line(tmp_path, args, message):
    from sharpscope.errors import UserError
    from sharpscope.training.trainer import Trainer

    with pytest.raises(UserError) as info:
        Trainer(_config("steps=2", *args), tmp_path / "run")
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_under_the_guards_cap_the_logged_lr_is_the_warmup_lr_times_its_scale(tmp_path):
    from sharpscope.metrics import STABILITY_LR_SCALE

    rows = run_rows(_train(tmp_path / "run", "steps=12", "optim.lr=0.3", *AUTO, "guard.action=cap",
                        "guard.threshold=0.1", "guard.patience=1"))[1:]
    scale, scaled = 1.0, 0
    for r in rows:
        if WARMUP_LR in r:
            assert r["lr"] == r[WARMUP_LR] * scale if scale != 1.0 else r["lr"] == r[WARMUP_LR]
            scaled += scale < 1.0
        scale = r.get(STABILITY_LR_SCALE, scale)  # the factor from the next step on
    assert scaled >= 1  # the guard cut the lr during warmup


def test_measure_and_mix_read_the_lr_an_auto_warmup_run_takes(tmp_path):
    # `sharpscope measure` (and mix) on a checkpoint of an auto-warmup run: during warmup the
    # controller's last lr, after it the schedule of a fixed warmup of the measured length
    # (not the configured warmup_steps, which the run never used).
    from sharpscope.measure.series import MeasureOptions, find_checkpoints, open_checkpoints
    from sharpscope.training.trainer import lr_at

    args = ["steps=20", "optim.lr=0.3", *AUTO, "checkpoint.every=6", "checkpoint.keep=5"]
    run = _train(tmp_path / "run", *args)
    rows = run_rows(run)
    end = next(int(r[WARMUP_STEPS]) for r in rows if WARMUP_STEPS in r)
    options = MeasureOptions(batch_size=4, n_batches=1, lanczos_iters=0, trace_samples=0, device="cpu")
    series = find_checkpoints(run / "checkpoints")
    target = open_checkpoints(series, "arithmetic", options)
    by_step = {c.step: target.load(c) for c in series.checkpoints}
    during = [s for s in by_step if s < end]
    after = [s for s in by_step if s >= end]
    assert during and after
    for s in during:
        state = json.loads((run / "checkpoints" / f"step{s:08d}" / "train_state.json").read_text())
        assert by_step[s].lr == state["warmup"]["lr"] and "auto warmup" in by_step[s].lr_source
    config = _config(*args)
    for s in after:
        assert by_step[s].lr == lr_at(config, min(s, 19), warmup_steps=end)
    # the data-mix advisor takes the same lr from the checkpoint
    from sharpscope.experiments.mix import checkpoint_lr

    for s in by_step:
        state = json.loads((run / "checkpoints" / f"step{s:08d}" / "train_state.json").read_text())
        assert checkpoint_lr(config, s, state) == by_step[s].lr
