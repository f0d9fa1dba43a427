"""The data-mix advisor on a nano GPT trained 30 steps on code: the sweep's numbers against
direct calls, the direction against a real optimizer step, nothing perturbed, the crossing
rule, the validation fine-tunes, the report section, the study part and the CLI."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from sharpscope.analysis.mix import crossing_summary, find_crossings, trade_off
from sharpscope.cli import main
from sharpscope.config import load_config
from sharpscope.curvature import critical_sharpness, relative_critical_sharpness
from sharpscope.experiments.mix import (MixConfig, MixStreams, MixStudyConfig, checkpoint_lr, fine_tune, load_for_mix,
                                        mix_direction, mix_sweep, n_pretrain_rows, read_result, run_mix_study,
                                        validate_mix)
from sharpscope.training import data as data_lib
from sharpscope.training.config import TrainConfig
from sharpscope.training.checkpoint import checkpoint_config
from sharpscope.training.optimizers import build_optimizer, plain_optimizer
from sharpscope.training.trainer import lm_loss, train

TINY = ["progress=false", "model.preset=nano", "model.block_size=32", "data.batch_size=4",
        "data.sources=code", "data.max_bytes=200000", "eval.every=10", "eval.batches=1",
        "eval.arithmetic_problems=4", "monitor.probe_batch_size=4", "monitor.every=0",
        "schedule.warmup_steps=3"]
SMALL_MIX = ["batch_size=8", "probe_batch_size=8", "eval_batches=1", "validate_lr=1e-3"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mix") / "base"
    train(load_config(TrainConfig, None, [*TINY, "steps=30"]), out)
    return out


@pytest.fixture(scope="module")
def checkpoint(run) -> Path:
    return run / "checkpoints" / "step00000030"


@pytest.fixture(scope="module")
def streams() -> MixStreams:
    kw = dict(max_bytes=200_000, block_size=33)
    return MixStreams({"code": data_lib.load_source("code", **kw)}, data_lib.load_source("arithmetic", **kw),
                      batch_size=8, block_size=32, probe_batch_size=8, probe_batches=1, eval_batches=1, seed=0)


def restored(checkpoint: Path):
    """(config, model, the optimizer that takes the steps, lr) at the checkpoint."""
    config = checkpoint_config(checkpoint)
    model, wrapper, state = load_for_mix(checkpoint, config, 256)
    return config, model, plain_optimizer(wrapper), checkpoint_lr(config, int(state["step"]))


def test_mixed_batch_shares_sequences_across_alpha(streams):
    assert [n_pretrain_rows(a, 8) for a in (0, 0.1, 0.25, 0.5, 0.75, 1)] == [0, 1, 2, 4, 6, 8]
    (x0, y0), n0 = streams.mixed_batch(0.0)
    (xh, yh), nh = streams.mixed_batch(0.5)
    (x1, _), n1 = streams.mixed_batch(1.0)
    assert (n0, nh, n1) == (0, 4, 8) and x0.shape == xh.shape == x1.shape == (8, 32)
    assert torch.equal(xh[:4], x1[:4]) and torch.equal(xh[4:], x0[:4])  # prefixes of the same pools
    assert torch.equal(xh[:, 1:], yh[:, :-1])
    assert not torch.equal(streams.mixed_batch(0.5, 1)[0][0], xh)  # the next index: other sequences


def test_sweep_matches_direct_calls_and_perturbs_nothing(checkpoint, streams):
    config, model, opt, lr = restored(checkpoint)
    params = [p.detach().clone() for p in model.parameters()]
    opt_state = copy.deepcopy(opt.state_dict())
    torch.manual_seed(123)
    np.random.seed(5)
    random.seed(7)
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    model.train()
    rows = mix_sweep(model, opt, streams, [0.0, 0.5, 1.0], lr=lr, grad_clip=0.0)

    # bit-identical afterwards: parameters, optimizer state and groups, grads, mode, RNG
    assert all(torch.equal(a, p) for a, p in zip(params, model.parameters()))
    after = opt.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    for i, s in opt_state["state"].items():
        for key, value in s.items():
            assert torch.equal(after["state"][i][key], value), (i, key)
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert torch.equal(torch.get_rng_state(), rng[0]) and np.array_equal(np.random.get_state()[1], rng[1])
    assert random.getstate() == rng[2]

    # α = 0: exactly a direct critical_sharpness call along the same direction, and
    # exactly relative_critical_sharpness of the pretraining loss along the mixture's update
    batch, _ = streams.mixed_batch(0.0)
    d = mix_direction(model, opt, batch, lr=lr)
    direct = critical_sharpness(model, lm_loss, streams.finetune_probe, d, eta0=lr)
    assert rows[0]["status_finetune"] == direct.status == "ok"
    assert rows[0]["lambda_finetune"] == direct.sharpness and rows[0]["evals_finetune"] == direct.evals
    for group in opt.param_groups:
        group["lr"] = lr
    rel = relative_critical_sharpness(model, lm_loss, streams.pretrain_probe, lm_loss, batch, optimizer=opt, eta0=lr)
    assert rows[0]["lambda_pretrain"] == rel.sharpness and rows[0]["status_pretrain"] == rel.status
    # later α are warm-started from the previous one: the same λ_c within the search's tolerance
    batch1, _ = streams.mixed_batch(1.0)
    d1 = mix_direction(model, opt, batch1, lr=lr)
    cold = critical_sharpness(model, lm_loss, streams.pretrain_probe, d1, eta0=lr)
    assert rows[2]["lambda_pretrain"] == pytest.approx(cold.sharpness, rel=2 / 16)


def test_direction_is_the_optimizers_real_step(checkpoint, streams):
    config, model, opt, lr = restored(checkpoint)
    assert config.optim.grad_clip > 0
    batch, _ = streams.mixed_batch(0.25)
    for clip in (config.optim.grad_clip, 1e-3):  # 1e-3: clipping certainly active
        d = mix_direction(model, opt, batch, lr=lr, grad_clip=clip)
        twin = copy.deepcopy(model)
        twin_opt = plain_optimizer(build_optimizer(config.optim, twin))
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        for group in twin_opt.param_groups:
            group["lr"] = lr
        before = [p.detach().clone() for p in twin.parameters()]
        lm_loss(twin, batch).backward()
        torch.nn.utils.clip_grad_norm_(list(twin.parameters()), clip)
        twin_opt.step()
        real = [(b - p.detach()) / lr for b, p in zip(before, twin.parameters())]
        for a, b in zip(d, real):
            assert torch.equal(a, b)  # the same operations in the same order: bit for bit
    d_clipped, d_raw = (mix_direction(model, opt, batch, lr=lr, grad_clip=c) for c in (1e-3, 0.0))
    assert any(not torch.equal(a, b) for a, b in zip(d_clipped, d_raw))  # clipping reaches AdamW's moments


def test_crossings_on_constructed_curves():
    a = [0.0, 0.25, 0.5, 0.75, 1.0]
    rising = find_crossings(a, [1, 2, 3, 4, 5], [5, 4, 3.5, 2, 1])  # δ = -4, -2, -0.5, 2, 4
    assert len(rising) == 1 and rising[0]["kind"] == "interpolated" and rising[0]["direction"] == "rising"
    assert rising[0]["alpha"] == pytest.approx(0.5 + 0.25 * 0.5 / 2.5) and rising[0]["between"] == [0.5, 0.75]
    assert find_crossings(a, [1, 1, 1, 1, 1], [2, 3, 4, 5, 6]) == []
    summary = crossing_summary([{"alpha": x, "lambda_finetune": 1.0, "lambda_pretrain": 2.0 + x} for x in a])
    assert summary["recommended_alpha"] is None and not summary["crosses"]
    assert "do not cross" in summary["note"] and "below" in summary["note"] and summary["closest_alpha"] == 0.0
    at_grid = find_crossings(a, [1, 2, 3, 4, 5], [3, 3, 3, 3, 3])
    assert [(c["alpha"], c["kind"], c["direction"]) for c in at_grid] == [(0.5, "at_grid", "rising")]
    inf_end = find_crossings(a, [1, 2, 3, 4, 5], [math.inf, math.inf, 1, 1, 1])
    assert [(c["alpha"], c["kind"]) for c in inf_end] == [(0.5, "at_finite_end")]
    skipped = find_crossings(a, [1, math.nan, 3, 4, 5], [2, 2, 2, 2, 2])  # NaN skipped: bracket (0, 0.5)
    assert skipped[0]["between"] == [0.0, 0.5] and skipped[0]["alpha"] == pytest.approx(0.25)
    falling = find_crossings(a, [5, 4, 3, 2, 1], [1, 2, 2.5, 3, 4])
    assert falling[0]["direction"] == "falling" and 0.5 < falling[0]["alpha"] < 0.75
    two = crossing_summary([{"alpha": x, "lambda_finetune": f, "lambda_pretrain": 2.0}
                            for x, f in zip(a, [1, 3, 1, 1, 3])])
    assert len(two["crossings"]) == 3 and two["recommended_alpha"] == pytest.approx(0.125)


def test_trade_off_criterion():
    rows = [{"alpha": 0.0, "gain": 1.0, "retention_loss": 0.5, "recommended": False},
            {"alpha": 0.5, "gain": 0.8, "retention_loss": 0.1, "recommended": True},
            {"alpha": 0.7, "gain": 0.7, "retention_loss": 0.2, "recommended": False},
            {"alpha": 1.0, "gain": 0.1, "retention_loss": -0.1, "recommended": False}]
    v = trade_off(rows, 1.0)
    assert [r["score"] for r in rows] == pytest.approx([0.5, 0.7, 0.5, 0.2])
    assert v["best_alpha"] == 0.5 and v["recommended_is_best"] and v["recommended_rank"] == 1
    assert v["pareto_alphas"] == [0.0, 0.5, 1.0]  # 0.7 is dominated by 0.5
    v = trade_off(rows, 0.0)  # retention ignored: the largest gain wins
    assert v["best_alpha"] == 0.0 and not v["recommended_is_best"] and v["recommended_on_pareto"]
    assert v["recommended_regret"] == pytest.approx(0.2)


def test_validation_fine_tunes_move_the_losses_as_expected(checkpoint, streams):
    def load():
        _, model, opt, _ = restored(checkpoint)
        return model, opt

    result = validate_mix(load, streams, [0.0, 1.0], recommended=0.5, steps=8, lr=1e-3, grad_clip=1.0)
    by_alpha = {r["alpha"]: r for r in result["rows"]}
    assert set(by_alpha) == {0.0, 0.5, 1.0} and by_alpha[0.5]["recommended"]
    assert all(r["status"] == "ok" and r["steps"] == 8 for r in result["rows"])
    assert by_alpha[0.0]["gain"] > by_alpha[0.5]["gain"] > by_alpha[1.0]["gain"]
    assert by_alpha[0.0]["gain"] > 0.05
    assert by_alpha[1.0]["retention_loss"] < by_alpha[0.5]["retention_loss"] < by_alpha[0.0]["retention_loss"]
    assert result["recommended_alpha"] == 0.5 and result["statement"]
    # the same α from the same checkpoint gives the same fine-tune (seeded, fresh state)
    m1, o1 = load()
    m2, o2 = load()
    fine_tune(m1, o1, streams, 0.5, steps=2, lr=1e-3)
    fine_tune(m2, o2, streams, 0.5, steps=2, lr=1e-3)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


def run_cli(capsys, argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_end_to_end_and_report_section(capsys, checkpoint, run, tmp_path):
    out = tmp_path / "study" / "mix"
    rc, stdout, err = run_cli(capsys, ["mix", run, "--pretrain", "code", "--finetune", "arithmetic", "--out", out,
                                       "--alphas", "0,0.5,1", "--validate-steps", "3", *SMALL_MIX,
                                       "validate_alphas=0,1"])
    assert rc == 0, err
    assert "crossing:" in stdout and "criterion:" in stdout and "Traceback" not in stdout + err
    for name in ("mix.json", "mix.csv", "mix_validation.csv", "figures/mix_sweep.png", "figures/mix_validation.png"):
        assert (out / name).is_file(), name
    result = read_result(out)
    assert result["checkpoint"] == str(checkpoint) and [r["alpha"] for r in result["sweep"]] == [0.0, 0.5, 1.0]
    assert result["validation"]["steps"] == 3 and result["config"]["batch_size"] == 8
    assert len((out / "mix.csv").read_text().splitlines()) == 4

    from sharpscope.report.mix_section import render

    assert render(tmp_path / "nothing", tmp_path / "report") is None
    body, figures = render(tmp_path / "study", tmp_path / "report")
    assert set(figures) == {"mix_sweep", "mix_validation"} and all(p.is_file() for p in figures.values())
    assert "id='fig-mix_sweep'" in body and "Criterion" in body
    (out / "figures" / "mix_sweep.png").unlink()  # redrawn from mix.json when missing
    body, figures = render(tmp_path / "study", tmp_path / "report2")
    assert figures["mix_sweep"].is_file()


def test_fresh_moments_take_a_new_optimizers_step(checkpoint, tmp_path):
    from sharpscope.experiments.mix import run_mix

    common = dict(alphas=[0.0, 1.0], batch_size=8, probe_batch_size=8, eval_batches=1, validate=False)
    kept = run_mix(checkpoint, "code", "arithmetic", MixConfig(**common), tmp_path / "kept")
    fresh = run_mix(checkpoint, "code", "arithmetic", MixConfig(moments="fresh", **common), tmp_path / "fresh")
    assert kept["moments"] == "checkpoint" and fresh["moments"] == "fresh"
    assert fresh["sweep"][0]["direction_norm"] != kept["sweep"][0]["direction_norm"]
    assert "validation" not in fresh and not (tmp_path / "fresh" / "mix_validation.csv").exists()
    assert (tmp_path / "fresh" / "mix.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--alphas", "0,1.5"], "outside [0, 1]"),
    (["--alphas", "0.5"], "at least 2 distinct"),
    (["--alphas", "0,x"], "must be numbers"),
    (["--finetune", "no-such-source"], "no-such-source"),
    (["--checkpoint", "missing"], "not found"),
    (["batch_size=0"], "batch_size"),
    (["alpha=0.5"], "unknown config key 'alpha'"),
    (["moments=old"], "moments"),
])
def test_cli_bad_input_is_one_line_and_writes_nothing(capsys, checkpoint, tmp_path, args, message):
    out = tmp_path / "out"
    ckpt, finetune = checkpoint, "arithmetic"
    args = list(args)
    if "--checkpoint" in args:
        ckpt = tmp_path / args[args.index("--checkpoint") + 1]
        args = args[:args.index("--checkpoint")]
    if "--finetune" in args:
        finetune = args[args.index("--finetune") + 1]
        args = args[:args.index("--finetune")]
    rc, stdout, err = run_cli(capsys, ["mix", ckpt, "--pretrain", "code", "--finetune", finetune, "--out", out,
                                       "--no-validate", *args])
    assert rc == 2, (stdout, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sharpscope: error:") and message in lines[0], err
    assert "Traceback" not in stdout + err
    assert not out.exists()


def test_study_part_trains_resumably_and_skips_what_is_done(tmp_path):
    defaults = load_config(TrainConfig, None, [*TINY, "data.batch_size=4"])
    cfg = load_config(MixStudyConfig, None, [
        "enabled=true", "pretrain=code", "finetune=arithmetic", "size=1x16", "steps=12", "monitor_points=0",
        "eval_points=2", "checkpoint_points=2", "mix.alphas=0,1", "mix.validate=false",
        *[f"mix.{o}" for o in SMALL_MIX]])
    logs: list[str] = []
    result = run_mix_study(cfg, tmp_path, defaults, log=logs.append)
    base = tmp_path / "mix" / "base"
    assert (base / "checkpoints" / "step00000012").is_dir() and (tmp_path / "mix" / "mix.json").is_file()
    config = json.loads((base / "config.json").read_text())["train"]
    assert config["data"]["sources"] == ["code"] and config["model"]["d_model"] == 16 and config["steps"] == 12
    assert result["step"] == 12 and len(result["sweep"]) == 2
    stamp = (tmp_path / "mix" / "mix.json").stat().st_mtime_ns
    logs.clear()
    again = run_mix_study(cfg, tmp_path, defaults, log=logs.append)
    assert (tmp_path / "mix" / "mix.json").stat().st_mtime_ns == stamp and "already" in logs[-1]
    assert again["sweep"][0]["lambda_finetune"] == result["sweep"][0]["lambda_finetune"]
