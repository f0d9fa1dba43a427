"""The SAM family and Nexus inside the trainer: each runs from the CLI, logs its
diagnostics, resumes bit for bit from a checkpoint (dropout on, so the RNG handling of the
repeated passes is part of what resume must restore), and the monitor does not perturb it."""

from __future__ import annotations

import shutil

import pytest
import torch

from sharpscope.cli import main
from test_trainer import TINY, final_weights, metric_rows, run_cli

OPTIMIZER_ARGS = {
    "sam": ["--optimizer", "sam", "optim.rho=0.05", "optim.rho_warmup_steps=4"],
    "precond-sam": ["--optimizer", "sam", "--precondition"],
    "functional-sam": ["--optimizer", "functional-sam", "--precondition"],
    "angle-sam": ["--optimizer", "angle-sam", "--phi", "0.5"],
    "nexus-cycle": ["--optimizer", "nexus", "--inner-steps", "2", "optim.inner_lr_follows_schedule=true"],
    "nexus-random": ["--optimizer", "nexus", "--inner-steps", "4", "optim.source_order=random"],
    "sam-sgd": ["--optimizer", "sam", "optim.base=sgd", "optim.lr=0.05"],
}
COMMON = ["--steps", "12", "--checkpoint-every", "6", "--monitor-every", "3", *TINY, "model.dropout=0.1"]


@pytest.mark.parametrize("name", list(OPTIMIZER_ARGS))
def test_resume_is_exact_and_diagnostics_are_logged(tmp_path, name):
    whole = tmp_path / "whole"
    assert run_cli("--out", str(whole), *COMMON, *OPTIMIZER_ARGS[name]) == 0
    rows = metric_rows(whole)
    trained = [r for r in rows if "train/loss" in r]
    assert len(trained) == 12 and all(torch.isfinite(torch.tensor(r["train/loss"])) for r in trained)
    keys = {"optim/loss_increase", "optim/rho"} if "sam" in name else {"optim/inner_cosine", "optim/pseudo_grad_norm"}
    assert keys <= set(trained[-1])
    assert any("sharpness/critical" in r for r in rows)
    assert all(-1 <= r["grad_cosine/arithmetic~code"] <= 1 for r in rows if "eval/loss" in r)
    # Interrupted after step 6: drop the last checkpoint and resume from the first.
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step00000012")
    assert run_cli("--out", str(cut), "--resume", *COMMON, *OPTIMIZER_ARGS[name]) == 0
    assert metric_rows(cut) == rows
    a, b = final_weights(cut), final_weights(whole)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sam_rho_warmup_and_loss_increase(tmp_path):
    out = tmp_path / "run"
    assert run_cli("--out", str(out), *COMMON, *OPTIMIZER_ARGS["sam"]) == 0
    trained = [r for r in metric_rows(out) if "train/loss" in r]
    assert [r["optim/rho"] for r in trained[:5]] == pytest.approx([0.0125, 0.025, 0.0375, 0.05, 0.05])
    assert all(r["optim/loss_increase"] > 0 for r in trained)  # the perturbation is an ascent step


@pytest.mark.parametrize("name", ["precond-sam", "nexus-cycle"])
def test_monitor_does_not_perturb_two_pass_optimizers(tmp_path, name):
    on, off = tmp_path / "on", tmp_path / "off"
    args = ["--steps", "8", *TINY, "model.dropout=0.1", *OPTIMIZER_ARGS[name]]
    assert run_cli("--out", str(on), "--monitor-every", "2", *args) == 0
    assert run_cli("--out", str(off), "--monitor-every", "0", *args) == 0
    a, b = final_weights(on), final_weights(off)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_measure_a_sam_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("--out", str(out), "--steps", "4", "--monitor-every", "0", *TINY, *OPTIMIZER_ARGS["precond-sam"]) == 0
    capsys.readouterr()
    ckpt = sorted((out / "checkpoints").glob("step*"))[-1]
    assert main(["measure", str(ckpt), "--data", "code", "--batch-size", "4", "--lanczos-iters", "6",
                 "--trace-samples", "2", "--json"]) == 0
    assert '"sharpness/preconditioned"' in capsys.readouterr().out


@pytest.mark.parametrize("args, expected", [
    (["--optimizer", "nexus", "--inner-steps", "3"], "must be a whole number >= 1 that divides data.batch_size"),
    (["--optimizer", "nexus", "optim.source_order=alphabetical"], "optim.source_order must be one of"),
    (["--optimizer", "sam", "optim.base=sgd", "--precondition"], "precondition=True reads Adam's second moment"),
    (["--optimizer", "sam", "--rho", "-1"], "rho must be a finite number >= 0"),
    (["--optimizer", "sam", "optim.base=lion"], "unknown base optimizer 'lion'"),
])
def test_bad_optimizer_settings_are_one_line_exit_2(tmp_path, capsys, args, expected):
    assert run_cli("--out", str(tmp_path / "run"), "--steps", "2", *TINY, *args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_nonfinite_perturbed_loss_stops_or_is_skipped(tmp_path, capsys):
    # ρ = 1e30 puts the perturbed point where the loss overflows: the step must not be taken.
    args = ["--steps", "3", "--monitor-every", "0", *TINY, "--optimizer", "sam", "--rho", "1e30"]
    assert run_cli("--out", str(tmp_path / "stop"), *args) == 2
    assert "training loss became" in capsys.readouterr().err
    assert run_cli("--out", str(tmp_path / "skip"), *args, "on_nonfinite=skip") == 0
    weights = final_weights(tmp_path / "skip")
    assert all(torch.isfinite(w).all() for w in weights.values())
