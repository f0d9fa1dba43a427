"""The training harness end to end on tiny CPU runs: run format, monitor does not
perturb, exact resume after SIGKILL, checkpoints, measure, and one-line errors."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sharpscope.cli import main
from sharpscope.runs import read_run

TINY = [
    "progress=false", "model.preset=nano", "model.block_size=32", "data.batch_size=4",
    "data.sources=arithmetic,code", "data.max_bytes=200000", "eval.every=10", "eval.batches=1",
    "eval.arithmetic_problems=4", "monitor.probe_batch_size=4", "schedule.warmup_steps=3",
]


def run_cli(*args: str) -> int:
    return main(["train", *args])


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    last = sorted((run / "checkpoints").glob("step*"))[-1]
    return load_file(str(last / "model.safetensors"))


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "monitored"
    assert run_cli("--out", str(out), "--steps", "20", "--monitor-every", "4", *TINY, "monitor.exact_every=10") == 0
    return out


def test_run_is_in_the_shared_format(monitored_run):
    run = read_run(monitored_run)
    assert run.config["source"] == "measured" and run.config["n_params"] > 0
    assert run.config["train"]["steps"] == 20
    t, loss = run.series("train/loss")
    assert len(loss) == 20 and t[-1] == 1.0
    _, lam = run.series("sharpness/critical")
    assert len(lam) == 5  # steps 0, 4, 8, 12, 16 (rows logged after the update)
    keys = run.keys()
    for key in ("lr", "tokens", "train/grad_norm", "sharpness/eta_c", "sharpness/lr_over_eta_c",
                "sharpness/two_over_lr", "sharpness/lambda_max", "sharpness/trace_per_param",
                "sharpness/preconditioned", "eval/loss", "eval/code/loss", "eval/code/bpb",
                "eval/arithmetic/accuracy"):
        assert key in keys, key
    first = metric_rows(monitored_run)[0]
    assert first["step"] == 0 and "eval/loss" in first


def test_monitor_does_not_perturb_training(monitored_run, tmp_path):
    plain = tmp_path / "plain"
    assert run_cli("--out", str(plain), "--steps", "20", "--monitor-every", "0", *TINY, "monitor.exact_every=10") == 0
    a, b = final_weights(monitored_run), final_weights(plain)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = lambda rows: [r["train/loss"] for r in rows if "train/loss" in r]
    assert losses(metric_rows(monitored_run)) == losses(metric_rows(plain))


def test_resume_after_sigkill_is_exact(tmp_path):
    args = ["--steps", "60", "--monitor-every", "5", "--checkpoint-every", "10", *TINY]
    whole = tmp_path / "whole"
    assert run_cli("--out", str(whole), *args) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "sharpscope", "train", "--out", str(killed), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "step00000020" / "train_state.json").exists():
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "step00000020").exists()
    assert not (killed / "checkpoints" / "step00000060").exists()  # killed mid-run
    assert run_cli("--out", str(killed), "--resume", *args) == 0
    assert metric_rows(killed) == metric_rows(whole)
    a, b = final_weights(killed), final_weights(whole)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_keeps_the_last_checkpoints(tmp_path):
    out = tmp_path / "run"
    assert run_cli("--out", str(out), "--steps", "12", "--checkpoint-every", "3", *TINY, "checkpoint.keep=2") == 0
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step00000009", "step00000012"]


def test_measure_a_checkpoint(monitored_run, capsys):
    ckpt = sorted((monitored_run / "checkpoints").glob("step*"))[-1]
    assert main(["measure", str(ckpt), "--data", "arithmetic", "--batch-size", "4", "--lanczos-iters", "8",
                 "--trace-samples", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 20
    assert out["sharpness/lambda_max"] > 0 and out["sharpness/trace_per_param"] == pytest.approx(
        out["sharpness/trace"] / read_run(monitored_run).n_params)
    assert out["critical_status"] in ("ok", "not_descent")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sharpscope: error:"), err
    return err[0]


def test_corrupt_checkpoint_is_refused_and_left_alone(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("--out", str(out), "--steps", "6", "--checkpoint-every", "3", *TINY, "checkpoint.keep=3") == 0
    capsys.readouterr()
    earlier = (out / "checkpoints" / "step00000003" / "model.safetensors").read_bytes()
    latest = out / "checkpoints" / "step00000006" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])  # truncated
    assert run_cli("--out", str(out), "--resume", "--steps", "9", *TINY) == 2
    assert "corrupt or truncated" in _error_line(capsys)
    assert (out / "checkpoints" / "step00000003" / "model.safetensors").read_bytes() == earlier
    assert main(["measure", str(latest.parent), "--data", "arithmetic"]) == 2
    assert "corrupt or truncated" in _error_line(capsys)


@pytest.mark.parametrize("args, expected", [
    (["optim.learning_rate=1"], "unknown config key 'optim.learning_rate'"),
    (["data.sources=/no/such/corpus.txt"], "/no/such/corpus.txt"),
    (["model.preset=colossal"], "unknown model preset"),
    (["schedule.name=triangle"], "unknown schedule"),
    (["optim.name=lion"], "unknown optimizer 'lion'"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, expected):
    assert run_cli("--out", str(tmp_path / "run"), "--steps", "2", *TINY, *args) == 2
    assert expected in _error_line(capsys)


def test_nonfinite_loss_stops_with_a_message_and_keeps_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--steps", "40", "--checkpoint-every", "1", *TINY, "optim.lr=1e6", "optim.grad_clip=0",
            "schedule.warmup_steps=0", "schedule.name=constant", "checkpoint.keep=100"]
    assert run_cli("--out", str(out), *args) == 2
    line = _error_line(capsys)
    assert "training loss became" in line and "lower optim.lr" in line
    for ckpt in (out / "checkpoints").glob("step*"):
        assert (ckpt / "train_state.json").exists()


def test_a_step_hook_is_one_more_entry(tmp_path):
    """A measurement added to ``step_hooks`` before ``write_row`` lands in every step's row."""
    from sharpscope.config import load_config
    from sharpscope.training import hooks
    from sharpscope.training.config import TrainConfig
    from sharpscope.training.trainer import Trainer

    seen = []

    def loss_guard(trainer, step, row):
        seen.append(step.done)
        row["guard/loss_finite"] = float(torch.isfinite(step.loss))

    trainer = Trainer(load_config(TrainConfig, None, ["steps=3", "monitor.every=0", *TINY]), tmp_path / "run")
    trainer.step_hooks.insert(trainer.step_hooks.index(hooks.write_row), loss_guard)
    trainer.run()
    assert seen == [1, 2, 3]
    assert [r.get("guard/loss_finite") for r in metric_rows(tmp_path / "run")] == [None, 1.0, 1.0, 1.0]


def test_existing_run_needs_resume(monitored_run, capsys):
    assert run_cli("--out", str(monitored_run), "--steps", "2", *TINY) == 2
    assert "--resume" in _error_line(capsys)


def test_tiny_config_file_loads():
    from sharpscope.config import load_config
    from sharpscope.training.config import TrainConfig

    cfg = load_config(TrainConfig, Path(__file__).parent.parent / "configs" / "tiny.toml")
    assert cfg.model.preset == "tiny" and cfg.monitor.every == 10


def test_tensorboard_sink_mirrors_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert run_cli("--out", str(out), "--steps", "6", "--monitor-every", "3", *TINY, "logging.tensorboard=true") == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([r["train/loss"] for r in metric_rows(out) if "train/loss" in r], rel=1e-6)
    assert [e.step for e in events.Scalars("sharpness/evals")] == [1, 4]


def _wandb_history(run_file: Path) -> list[dict]:
    """History rows of an offline W&B run file: a 7-byte header, then records in 32 KiB
    blocks, each chunk behind a 7-byte header (crc32, little-endian length, type: 1 whole,
    2 first, 3 middle, 4 last), each record a protobuf ``Record``."""
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little left in this block for a header: padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def test_wandb_offline_sink_mirrors_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert run_cli("--out", str(out), "--steps", "6", "--monitor-every", "3", *TINY, "logging.wandb=true") == 0
    files = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1  # offline: written here, nothing sent
    history = _wandb_history(files[0])
    logged = [r for r in history if "train/loss" in r]
    assert [r["train/loss"] for r in logged] == pytest.approx(
        [r["train/loss"] for r in metric_rows(out) if "train/loss" in r], rel=1e-6)
    assert [r["_step"] for r in history if "sharpness/evals" in r] == [1, 4]


def test_bpe_run_keeps_its_tokenizer_for_resume_and_measure(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    out = tmp_path / "bpe"
    args = ["--steps", "6", "--checkpoint-every", "3", *TINY, "data.tokenizer=bpe", "data.vocab_size=300",
            "data.sources=arithmetic,code", "data.max_bytes=100000"]
    assert run_cli("--out", str(out), *args) == 0
    assert (out / "tokenizer.json").is_file()
    weights = final_weights(out)
    embedding = weights.get("tok_emb.weight", weights.get("head.weight"))  # tied: saved under one name
    assert embedding.shape[0] == 300
    row = [r for r in metric_rows(out) if "eval/code/bpb" in r][-1]
    assert row["eval/code/bpb"] < row["eval/code/loss"] / math.log(2)  # BPE packs > 1 byte per token
    capsys.readouterr()
    assert main(["measure", str(out / "checkpoints" / "step00000006"), "--data", "arithmetic", "--batch-size", "4",
                 "--lanczos-iters", "4", "--trace-samples", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 6
