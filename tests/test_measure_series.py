"""`sharpscope measure PATH` on what people have: a transformers.Trainer output folder, a
save_pretrained folder, and our own runs. Real frameworks, offline: a tiny Llama trained
for a few steps by a real Trainer (checkpoint-N folders with optimizer.pt and
scheduler.pt), a real byte-level BPE tokenizer saved beside it."""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

import sharpscope  # noqa: E402
from sharpscope.cli import main  # noqa: E402
from sharpscope.runs import read_run, write_run  # noqa: E402
from sharpscope.training import data as data_lib  # noqa: E402
from sharpscope.measure.series import (MeasureOptions, direction_for, find_checkpoints,  # noqa: E402
                                         measure_checkpoint, measure_path, open_checkpoints)

BLOCK, LR, WD = 24, 3e-3, 0.1
# λ_c alone where λ_max and the trace are not what a test is about (they cost most of a measurement)
FAST = ["--batch-size", "4", "--lanczos-iters", "0", "--trace-samples", "0", "--no-progress"]


def fast_options(**kw) -> MeasureOptions:
    return MeasureOptions(**{"batch_size": 4, "lanczos_iters": 4, "trace_samples": 2, "device": "cpu", **kw})


def _tokenizer():
    """A real byte-level BPE trained on the built-in prose corpus, as transformers saves it."""
    text = data_lib.ByteTokenizer().decode(data_lib.load_source("prose", max_bytes=60_000).train)
    tk = tokenizers.Tokenizer(tokenizers.models.BPE())
    tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([text], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>"), text


def _training_args(output_dir, **kw):
    return transformers.TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=4, learning_rate=LR, weight_decay=WD,
        warmup_steps=2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, logging_steps=1, **kw)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Trainer output folder with checkpoint-2/4/6 and the tokenizer at its top, plus a
    save_pretrained folder of the final model."""
    root = tmp_path_factory.mktemp("hf")
    tokenizer, text = _tokenizer()
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    rows = torch.from_numpy(ids[: (len(ids) // (BLOCK + 1)) * (BLOCK + 1)].reshape(-1, BLOCK + 1))[:64]

    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i], "labels": rows[i]}

    transformers.set_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config)
    out = root / "trainer-out"
    trainer = transformers.Trainer(model=model, args=_training_args(out, max_steps=6, save_steps=2),
                                   train_dataset=Rows())
    trainer.train()
    trainer.save_model()  # the final model at the top, beside the checkpoints, as most scripts do
    tokenizer.save_pretrained(out)
    pretrained = root / "pretrained"
    model.save_pretrained(pretrained)
    tokenizer.save_pretrained(pretrained)
    return {"out": out, "pretrained": pretrained, "tokenizer": tokenizer, "root": root}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sharpscope: error:"), err
    return err[0]


# --------------------------------------------------------------------------- Trainer folders


def test_trainer_folder_is_a_series_in_step_order_and_a_run(trained, tmp_path):
    series = find_checkpoints(trained["out"])
    assert [c.step for c in series.checkpoints] == [2, 4, 6] and series.kind == "hf"
    seen = []
    result = measure_path(trained["out"], "prose", fast_options(), out=tmp_path / "run",
                          on_result=lambda r: seen.append(r["step"]))
    assert seen == [2, 4, 6]
    for r in result.results:
        assert r["direction"] == "optimizer" and "AdamW state from optimizer.pt" in r["direction_note"]
        assert r["lr_source"].startswith("scheduler.pt")
        assert r["critical_status"] == "ok" and r["sharpness/critical"] > 0
        # lr 0 at the end of the decay: Adam's threshold 38/lr is infinite, nothing to compare
        assert (r["sharpness/preconditioned"] > 0) if r["step"] < 6 else "sharpness/preconditioned" not in r
    # the Trainer's linear schedule for the next step: the peak after 2 warmup steps, then down to 0 at step 6
    assert [r["lr"] for r in result.results] == pytest.approx([LR, LR / 2, 0.0])
    run = read_run(tmp_path / "run")
    assert run.config["source"] == "measured" and run.config["group"] == "training"
    assert run.config["model_type"] == "llama" and run.config["direction"] == "optimizer"
    assert run.n_params == sum(p.numel() for p in
                               transformers.AutoModelForCausalLM.from_pretrained(trained["pretrained"]).parameters())
    assert [row["step"] for row in run.metrics] == [2, 4, 6]
    assert [row["t"] for row in run.metrics] == pytest.approx([1 / 3, 2 / 3, 1])
    assert all("train/loss" in row and row["sharpness/critical"] > 0 for row in run.metrics)
    assert run.metrics[-1]["sharpness/two_over_lr"] is None  # 2/0
    t, lam = run.series("sharpness/critical")
    assert len(lam) == 3 and np.all(np.isfinite(lam))
    # the same settings again: every row is kept, nothing is measured twice
    again = measure_path(trained["out"], "prose", fast_options(), out=tmp_path / "run")
    assert again.results == [] and again.reused == [2, 4, 6]
    assert read_run(tmp_path / "run").metrics == run.metrics


def _reference_step(checkpoint, batches):
    """The update the Trainer's own AdamW takes next from this checkpoint: the optimizer
    built by Trainer.create_optimizer, loaded from optimizer.pt, stepped on the batches."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    trainer = transformers.Trainer(model=model, args=_training_args(checkpoint.parent / "ref"))
    optimizer = trainer.create_optimizer()
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    loss = sum(model(input_ids=torch.cat([x, y[:, -1:]], 1), labels=torch.cat([x, y[:, -1:]], 1)).loss
               for x, y in batches) / len(batches)
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    with torch.no_grad():
        d = [(b - p) / lr for b, p in zip(before, model.parameters())]
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    return model, d, lr


def test_direction_is_the_trainers_next_adamw_update_and_lambda_c_agrees(trained):
    checkpoint = trained["out"] / "checkpoint-4"
    options = fast_options(n_batches=2)
    series = find_checkpoints(checkpoint)
    target = open_checkpoints(series, "prose", options)
    loaded = target.load(series.checkpoints[0])
    direction, name, _ = direction_for(loaded, target, options)
    model, reference, lr = _reference_step(checkpoint, target.batches)
    assert name == "optimizer" and lr == pytest.approx(LR / 2)
    for d, r in zip(direction, reference):
        assert torch.allclose(d, r, rtol=1e-5, atol=1e-6 * float(r.abs().max()) + 1e-7)
    # λ_c of `measure` is sharpscope.critical_sharpness on the loaded model along that update
    direct = sharpscope.critical_sharpness(model, lambda m, b: m(input_ids=torch.cat([b[0], b[1][:, -1:]], 1),
                                                                  labels=torch.cat([b[0], b[1][:, -1:]], 1)).loss,
                                           target.batches, reference, eta0=lr)
    measured = measure_checkpoint(checkpoint, "prose", batch_size=4, n_batches=2, lanczos_iters=4, trace_samples=2,
                                  device="cpu")
    assert measured["sharpness/critical"] == pytest.approx(direct.sharpness, rel=1e-4)
    assert measured["sharpness/lr_over_eta_c"] == pytest.approx(lr / direct.eta, rel=1e-4)


def test_clipped_direction_is_the_clipped_trainer_step(trained):
    checkpoint = trained["out"] / "checkpoint-2"
    options = fast_options(max_grad_norm=0.05)
    series = find_checkpoints(checkpoint)
    target = open_checkpoints(series, "prose", options)
    direction, _, _ = direction_for(target.load(series.checkpoints[0]), target, options)
    plain, _, _ = direction_for(target.load(series.checkpoints[0]), target, fast_options())
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    optimizer = transformers.Trainer(model=model, args=_training_args(checkpoint.parent / "ref")).create_optimizer()
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
    x, y = target.batches[0]
    ids = torch.cat([x, y[:, -1:]], 1)
    model(input_ids=ids, labels=ids).loss.backward()
    assert torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05) > 0.05  # the clip is active
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    lr = optimizer.param_groups[0]["lr"]
    for d, b, p in zip(direction, before, model.parameters()):
        r = (b - p.detach()) / lr
        assert torch.allclose(d, r, rtol=1e-5, atol=1e-6 * float(r.abs().max()) + 1e-7)
    assert not all(torch.allclose(a, b) for a, b in zip(direction, plain))


def test_without_optimizer_state_the_fallback_is_named(trained, tmp_path, capsys):
    bare = tmp_path / "checkpoint-4"
    shutil.copytree(trained["out"] / "checkpoint-4", bare)
    (bare / "optimizer.pt").unlink()
    shutil.copy(trained["out"] / "tokenizer.json", bare)
    shutil.copy(trained["out"] / "tokenizer_config.json", bare)
    assert main(["measure", str(bare), "--data", "prose", *FAST, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["direction"] == "gradient" and "no optimizer.pt" in out["direction_note"]
    assert out["step"] == 4 and out["lr"] == pytest.approx(LR / 2)  # scheduler.pt is still there
    assert "sharpness/preconditioned" not in out and "sharpness/lambda_max" not in out  # skipped by 0 iterations
    assert main(["measure", str(bare), "--data", "prose", *FAST, "--direction", "optimizer"]) == 2
    assert "no optimizer.pt" in _error_line(capsys)
    # Adam warmed on a few batches, the other documented fallback
    assert main(["measure", str(bare), "--data", "prose", *FAST, "--direction", "adam", "--warm-batches", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["direction"] == "adam" and "warmed on 3 batches" in out["direction_note"]
    assert out["critical_status"] == "ok"
    # the gradient asked for where Adam state exists: that state still gives preconditioned sharpness
    assert main(["measure", str(trained["out"] / "checkpoint-4"), "--data", "prose", *FAST, "--lanczos-iters", "3",
                 "--direction", "gradient", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["direction"] == "gradient" and out["sharpness/preconditioned"] > 0


def test_save_pretrained_folder_and_token_bin(trained, tmp_path, capsys):
    assert main(["measure", str(trained["pretrained"]), "--data", "prose", *FAST, "--lr", "1e-3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 0 and out["direction"] == "gradient" and out["lr_source"] == "--lr"
    assert out["sharpness/two_over_lr"] == pytest.approx(2e3)
    assert "sharpness/preconditioned" not in out  # no optimizer state in a save_pretrained folder
    # pre-tokenized data needs no tokenizer and is used as it is
    alone = tmp_path / "model"
    alone.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(trained["pretrained"] / name, alone)
    tokens = np.random.default_rng(0).integers(0, 300, 4000).astype(np.uint16)
    tokens.tofile(tmp_path / "tokens.bin")
    assert main(["measure", str(alone), "--data", str(tmp_path / "tokens.bin"), *FAST, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data"] == "tokens" and math.isfinite(out["loss"])
    assert out["lr"] is None and out["sharpness/lr_over_eta_c"] is None
    assert main(["measure", str(alone), "--data", "prose", *FAST]) == 2
    assert "no tokenizer saved in" in _error_line(capsys)


def test_our_run_is_a_series_too(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--steps", "4", "--checkpoint-every", "2", "progress=false",
                 "model.preset=nano", "model.block_size=16", "data.batch_size=4", "data.sources=arithmetic",
                 "data.max_bytes=50000", "eval.every=0", "monitor.every=0", "checkpoint.keep=2"]) == 0
    capsys.readouterr()
    assert main(["measure", str(run), "--data", "arithmetic", "--batch-size", "4", "--lanczos-iters", "3",
                 "--trace-samples", "2", "--out", str(tmp_path / "m")]) == 0
    printed = capsys.readouterr().out
    assert "direction optimizer: adamw state from the checkpoint" in printed
    measured = read_run(tmp_path / "m")
    assert [r["step"] for r in measured.metrics] == [2, 4]
    assert [r["t"] for r in measured.metrics] == pytest.approx([0.5, 1.0])
    assert all(r["sharpness/lambda_max"] > 0 and "sharpness/trace_per_param" in r for r in measured.metrics)
    # the trained run itself is never replaced by a measurement of it, even with --force
    before = (run / "metrics.jsonl").read_bytes()
    assert main(["measure", str(run), "--data", "arithmetic", *FAST, "--out", str(run), "--force"]) == 2
    assert "more than its two files" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == before
    # ... nor when its metrics end in a line cut off by a killed writer (it reads as damaged)
    with open(run / "metrics.jsonl", "ab") as fh:
        fh.write(b'{"step": 5, "train/lo')
    damaged, config = (run / "metrics.jsonl").read_bytes(), (run / "config.json").read_bytes()
    assert main(["measure", str(run), "--data", "arithmetic", *FAST, "--out", str(run), "--force"]) == 2
    assert "more than a measured run" in capsys.readouterr().err
    assert (run / "metrics.jsonl").read_bytes() == damaged and (run / "config.json").read_bytes() == config
    (run / "metrics.jsonl").write_bytes(before)
    assert measured.n_params == read_run(run).n_params
    assert measured.config["measured_run"] == read_run(run).name and measured.config["optimizer"] == "adamw"


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_are_one_line_exit_2(trained, tmp_path, capsys):
    def refused(path, *extra, data="prose") -> str:
        assert main(["measure", str(path), "--data", data, *FAST, *extra]) == 2
        return _error_line(capsys)

    assert "not found" in refused(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "holds no checkpoint" in refused(tmp_path / "empty")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert "PEFT adapter" in refused(tmp_path / "adapter")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(trained["pretrained"] / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not even read")
    assert "never unpickles" in refused(pickled)
    unknown = tmp_path / "unknown"
    shutil.copytree(trained["pretrained"], unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "nonesuch"}))
    assert "model type 'nonesuch'" in refused(unknown)
    broken = tmp_path / "broken"
    shutil.copytree(trained["pretrained"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    assert "damaged" in refused(broken)
    # an optimizer.pt from another model: its groups do not fit
    other = tmp_path / "other"
    shutil.copytree(trained["out"] / "checkpoint-2", other)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(trained["tokenizer"]), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    opt = transformers.Trainer(model=model, args=_training_args(tmp_path / "o")).create_optimizer()
    model(input_ids=torch.zeros(1, 4, dtype=torch.long), labels=torch.zeros(1, 4, dtype=torch.long)).loss.backward()
    opt.step()
    torch.save(opt.state_dict(), other / "optimizer.pt")
    shutil.copy(trained["out"] / "tokenizer.json", other)
    assert "not this model's" in refused(other)
    # a pickle that weights_only refuses: auto falls back and says why
    (other / "optimizer.pt").write_bytes(b"\x80\x04\x95")
    assert main(["measure", str(other), "--data", "prose", *FAST, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["direction"] == "gradient" and "weights_only=True" in out["direction_note"]
    assert "--trace-samples must be 0" in refused(trained["pretrained"], "--trace-samples", "1")
    assert "--block-size 64 needs 65 positions" in refused(trained["pretrained"], "--block-size", "64")
    write_run(tmp_path / "taken", {"name": "x", "n_params": 10, "source": "simulated"}, [{"step": 0}])
    assert "holds another run" in refused(trained["pretrained"], "--out", str(tmp_path / "taken"))
    assert main(["measure", str(trained["pretrained"]), "--data", "prose", *FAST, "--out", str(tmp_path / "taken"),
                 "--force"]) == 0
    assert read_run(tmp_path / "taken").config["measure"]["direction"] == "auto"
    capsys.readouterr()
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("mine")
    assert "holds no run" in refused(trained["pretrained"], "--out", str(tmp_path / "stray"), "--force")
