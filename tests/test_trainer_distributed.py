"""DDP through torchrun on CPU: two gloo processes train on halves of each global batch
and log what one process logs on the whole batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from sharpscope.cli import main

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

ARGS = ["--steps", "12", "--monitor-every", "3", "progress=false", "model.preset=nano", "model.block_size=32",
        "data.batch_size=8", "data.sources=code", "data.max_bytes=200000", "eval.every=6", "eval.batches=1",
        "monitor.probe_batch_size=8", "monitor.exact_every=6", "monitor.lanczos_iters=6", "monitor.trace_samples=4",
        "schedule.warmup_steps=2"]


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    single, ddp = root / "single", root / "ddp"
    assert main(["train", "--out", str(single), *ARGS]) == 0
    env_cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "sharpscope", "train", "--out", str(ddp), *ARGS]
    proc = subprocess.run(env_cmd, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return single, ddp


def test_same_losses_as_one_process_on_the_global_batch(runs):
    single, ddp = runs
    a, b = rows(single), rows(ddp)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train/loss", "train/grad_norm", "eval/loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-4), (ra["step"], key)


def test_monitor_takes_part_on_every_rank(runs):
    single, ddp = runs
    a = [r for r in rows(single) if "sharpness/critical" in r]
    b = [r for r in rows(ddp) if "sharpness/critical" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 4, 7, 10]
    for ra, rb in zip(a, b):
        if ra["sharpness/critical"] is not None:
            # same decisions up to float reduction order; each within the search's rtol
            assert rb["sharpness/critical"] == pytest.approx(ra["sharpness/critical"], rel=1 / 16)
    exact_a = [r["sharpness/lambda_max"] for r in rows(single) if "sharpness/lambda_max" in r]
    exact_b = [r["sharpness/lambda_max"] for r in rows(ddp) if "sharpness/lambda_max" in r]
    assert exact_b == pytest.approx(exact_a, rel=1e-3)


def test_final_weights_match(runs):
    single, ddp = runs
    a = load_file(str(single / "checkpoints" / "step00000012" / "model.safetensors"))
    b = load_file(str(ddp / "checkpoints" / "step00000012" / "model.safetensors"))
    # AdamW divides by √v: where a gradient is ~0, float reduction order alone moves the
    # step by a fraction of lr (3e-3). Bound the difference well below one step.
    worst = max(float((a[key] - b[key]).abs().max()) for key in a)
    assert worst < 3e-4, worst
    close = sum(int(torch.isclose(a[k], b[k], rtol=1e-4, atol=1e-6).sum()) for k in a)
    assert close / sum(t.numel() for t in a.values()) > 0.99


def test_batch_must_split_evenly(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sharpscope", "train", "--out", str(tmp_path / "run"), *ARGS, "data.batch_size=7"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "must be divisible by the number of processes" in proc.stderr


def test_resume_under_ddp_with_dropout_is_exact(tmp_path):
    import shutil

    run = tmp_path / "run"
    args = ["--out", str(run), *ARGS, "model.dropout=0.2", "--checkpoint-every", "6", "checkpoint.keep=5"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "sharpscope", "train"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launch + args, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    whole = rows(run)
    final = load_file(str(run / "checkpoints" / "step00000012" / "model.safetensors"))
    shutil.rmtree(run / "checkpoints" / "step00000012")  # as if killed after step 6's checkpoint
    proc = subprocess.run(launch + args + ["--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert rows(run) == whole
    again = load_file(str(run / "checkpoints" / "step00000012" / "model.safetensors"))
    for key in final:
        assert torch.equal(final[key], again[key]), key
