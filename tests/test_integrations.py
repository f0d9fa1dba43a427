"""The Hugging Face and Lightning callbacks and the monitor in a plain loop, offline, with
the real frameworks: tiny randomly initialised GPT-2 / Llama models in a real
``transformers.Trainer`` (warmup from lr 0, gradient accumulation, sparse logging, bf16,
resume from ``checkpoint-N``, TensorBoard) and a tiny module in a real ``lightning.Trainer``
(default log cadence, failed measurements, accumulation, bf16-mixed). Each measures on
its cadence, every measurement reaches the framework's own logs exactly once at one
consistent step, the run directory is complete, and training is left bit-identical."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sharpscope.runs import read_run

from support.tiny_lm import BLOCK, VOCAB, counting_tokens, lightning_tiny_lm
from support.training import run_rows

SHARP_KEYS = ("sharpness/critical", "sharpness/evals")


# ---- Hugging Face ---------------------------------------------------------------------

def _hf_model(kind="gpt2"):
    transformers = pytest.importorskip("transformers")
    transformers.set_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                          max_position_embeddings=BLOCK)
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _hf_trainer(out, callbacks, *, kind="gpt2", n=64, **overrides):
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import Dataset

    class Tokens(Dataset):
        def __init__(self):
            self.ids = counting_tokens(n)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    model = _hf_model(kind)
    settings = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=8, logging_steps=1,
                    report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3, disable_tqdm=True,
                    seed=0)
    settings.update(overrides)
    args = transformers.TrainingArguments(**settings)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)


def _probe():
    ids = counting_tokens(8, seed=1)
    return {"input_ids": ids, "labels": ids}


def _logged_measurements(trainer):
    return [row for row in trainer.state.log_history if any(k in row for k in SHARP_KEYS)]


def test_hf_callback_measures_logs_and_does_not_perturb(tmp_path):
    pytest.importorskip("transformers")
    from sharpscope.integrations.hf import SharpnessCallback

    callback = SharpnessCallback(_probe(), every=2, run_dir=tmp_path / "run", name="gpt2-tiny")
    trainer = _hf_trainer(tmp_path / "hf", [callback])
    trainer.train()
    # Steps are the Trainer's own (optimizer steps completed): the first step and every 2nd.
    assert [step for step, _ in callback.history] == [1, 2, 4, 6]
    for _, metrics in callback.history:
        assert metrics["sharpness/evals"] >= 2
    assert [row["step"] for row in _logged_measurements(trainer)] == [1, 2, 4, 6]
    run = read_run(tmp_path / "run")
    assert run.config["source"] == "measured"
    _, loss = run.series("train/loss")
    assert len(loss) == 6
    plain = _hf_trainer(tmp_path / "plain", [])
    plain.train()
    for (name, a), (_, b) in zip(trainer.model.state_dict().items(), plain.model.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hf_sequence_losses_average_to_the_models_own_loss(kind):
    # The callback's default loss returns one value per row so that λ_c has a standard
    # error; their mean must be the model's own loss, padding (-100 labels) included.
    pytest.importorskip("transformers")
    from sharpscope.integrations.hf import causal_lm_loss, causal_lm_sequence_losses

    model = _hf_model(kind).eval()  # no dropout: the two losses see the same network
    batch = _probe()
    labels = batch["labels"].clone()
    labels[0, 10:] = -100  # a short row
    labels[3, :5] = -100  # a prompt that is not predicted
    batch = {"input_ids": batch["input_ids"], "labels": labels}
    with torch.no_grad():
        rows = causal_lm_sequence_losses(model, batch)
        own = causal_lm_loss(model, batch)
    assert rows.shape == (8,)
    assert float(rows.mean()) == pytest.approx(float(own), rel=1e-5)


def test_hf_callback_logs_the_standard_error_of_critical_sharpness(tmp_path):
    pytest.importorskip("transformers")
    from sharpscope.integrations.hf import SharpnessCallback

    callback = SharpnessCallback(_probe(), every=2, run_dir=tmp_path / "run")
    _hf_trainer(tmp_path / "hf", [callback]).train()
    measured = [m for _, m in callback.history if "sharpness/critical" in m]
    assert measured and all(0 < m["sharpness/critical_se"] for m in measured)
    assert all("sharpness/descent_step" in m for _, m in callback.history)
    rows = [r for r in run_rows(tmp_path / "run") if "sharpness/critical" in r]
    assert all("sharpness/critical_se" in r for r in rows)


def test_hf_warmup_from_lr_zero_defers_the_measurement_to_the_next_step(tmp_path):
    """F1: HF schedules start at lr 0; the step-1 measurement moves to step 2 and says so."""
    pytest.importorskip("transformers")
    from sharpscope.integrations.hf import SharpnessCallback

    callback = SharpnessCallback(_probe(), every=5, run_dir=tmp_path / "run")
    trainer = _hf_trainer(tmp_path / "hf", [callback], max_steps=12, logging_steps=10, warmup_steps=2,
                          lr_scheduler_type="constant_with_warmup")
    trainer.train()
    assert [step for step, _ in callback.history] == [2, 5, 10]
    first = dict(callback.history)[2]
    assert first["sharpness/deferred_from"] == 1
    assert math.isclose(first["sharpness/lr_over_eta_c"] * first["sharpness/eta_c"], 0.5e-3, rel_tol=1e-9)
    rows = {r["step"]: r for r in run_rows(tmp_path / "run")}
    assert rows[2]["sharpness/deferred_from"] == 1
    assert "sharpness/deferred_from" not in rows[5]


@pytest.mark.parametrize("logging_steps,accumulation", [(10, 1), (500, 2)])
def test_hf_every_measurement_reaches_log_history_once_at_its_step(tmp_path, logging_steps, accumulation):
    """F2: with logging sparser than measuring (and with accumulation), each measurement
    is in log_history exactly once, at the step the run directory gives it."""
    pytest.importorskip("transformers")
    from sharpscope.integrations.hf import SharpnessCallback

    callback = SharpnessCallback(_probe(), every=5, run_dir=tmp_path / "run")
    trainer = _hf_trainer(tmp_path / "hf", [callback], max_steps=20, logging_steps=logging_steps,
                          per_device_train_batch_size=4, gradient_accumulation_steps=accumulation)
    trainer.train()
    measured = [step for step, _ in callback.history]
    assert measured == [1, 5, 10, 15, 20]
    logged = _logged_measurements(trainer)
    assert [row["step"] for row in logged] == measured
    for row, (_, metrics) in zip(logged, callback.history):
        for key, value in metrics.items():
            if math.isfinite(value):
                assert row[key] == value
    rows = [r for r in run_rows(tmp_path / "run") if "sharpness/evals" in r]
    assert [r["step"] for r in rows] == measured
    steps = [r["step"] for r in run_rows(tmp_path / "run")]
    assert steps == sorted(set(steps)), "one row per step, in order"


def test_hf_run_directory_has_loss_grad_norm_and_lr_from_the_trainer(tmp_path):
    """F6: the run carries train/loss, train/grad_norm and lr, as the Trainer logged them."""
    pytest.importorskip("transformers")
    from sharpscope.integrations.hf import SharpnessCallback

    callback = SharpnessCallback(_probe(), every=3, run_dir=tmp_path / "run", group="scales", model="llama-tiny")
    trainer = _hf_trainer(tmp_path / "hf", [callback], kind="llama", max_steps=6, logging_steps=2,
                          lr_scheduler_type="cosine", max_grad_norm=0.5)
    trainer.train()
    rows = {r["step"]: r for r in run_rows(tmp_path / "run")}
    hf_logs = [r for r in trainer.state.log_history if "loss" in r]
    assert hf_logs
    for entry in hf_logs:
        row = rows[entry["step"]]
        assert row["train/loss"] == pytest.approx(entry["loss"])
        assert row["train/grad_norm"] == pytest.approx(entry["grad_norm"])
        assert row["lr"] == pytest.approx(entry["learning_rate"])
    config = read_run(tmp_path / "run").config
    assert config["group"] == "scales" and config["model"] == "llama-tiny"
    assert config["monitor"]["precision"] == "float32" and config["monitor"]["autocast"] is None


def test_hf_reporters_see_every_measurement(tmp_path, monkeypatch):
    """Reporters run before user callbacks in the Trainer's list; the TensorBoard event
    file must still get each measurement at its step."""
    pytest.importorskip("transformers")
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from sharpscope.integrations.hf import SharpnessCallback

    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    callback = SharpnessCallback(_probe(), every=4)
    trainer = _hf_trainer(tmp_path / "hf", [callback], max_steps=8, logging_steps=100,
                          report_to=["tensorboard"])
    trainer.train()
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    # The TensorBoard reporter files training logs under "train/".
    got = [e.step for e in events.Scalars("train/sharpness/evals")]
    assert got == [1, 4, 8]


def test_hf_bf16_training_does_not_put_the_probes_in_bf16(tmp_path):
    """F5: accelerate wraps model.forward in bf16 autocast; autocast=None means float32."""
    pytest.importorskip("transformers")
    from sharpscope import critical_sharpness
    from sharpscope.integrations.hf import SharpnessCallback, causal_lm_loss

    dtypes: list[torch.dtype] = []
    recording = [False]

    def loss_fn(model, batch):
        recording[0] = True
        try:
            return causal_lm_loss(model, batch)
        finally:
            recording[0] = False

    callback = SharpnessCallback(_probe(), every=2, loss_fn=loss_fn, run_dir=tmp_path / "run")
    trainer = _hf_trainer(tmp_path / "hf", [callback], bf16=True, max_steps=4)
    trainer.model.lm_head.register_forward_hook(
        lambda module, inputs, output: dtypes.append(output.dtype) if recording[0] else None)
    trainer.train()
    assert "_original_forward" in trainer.model.__dict__, "accelerate did wrap forward (the case tested)"
    assert dtypes and set(dtypes) == {torch.float32}
    # Later direct calls on the wrapped model too.
    dtypes.clear()
    model = trainer.model
    direction = [torch.ones_like(p) * 1e-3 for p in model.parameters() if p.requires_grad]
    critical_sharpness(model, loss_fn, _probe(), direction)
    assert dtypes and set(dtypes) == {torch.float32}
    assert read_run(tmp_path / "run").config["monitor"]["precision"] == "float32"
    # ... while autocast=torch.bfloat16 asks for bf16 and gets it.
    dtypes.clear()
    critical_sharpness(model, loss_fn, _probe(), direction, autocast=torch.bfloat16)
    assert set(dtypes) == {torch.bfloat16}


def _interrupt_at(step):
    transformers = pytest.importorskip("transformers")

    class Stop(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                control.should_training_stop = True

    return Stop()


def test_hf_resume_from_checkpoint_keeps_one_row_per_step_and_the_warm_start(tmp_path):
    """F6: resuming from checkpoint-N neither duplicates rows nor loses the warm start; the
    resumed run's measurements are those of the uninterrupted run."""
    pytest.importorskip("transformers")
    from sharpscope.integrations.hf import SharpnessCallback

    common = dict(max_steps=8, logging_steps=2, save_strategy="steps", save_steps=4)
    whole = SharpnessCallback(_probe(), every=2, run_dir=tmp_path / "whole")
    _hf_trainer(tmp_path / "hf-whole", [whole], **common).train()

    first = SharpnessCallback(_probe(), every=2, run_dir=tmp_path / "run")
    _hf_trainer(tmp_path / "hf", [first, _interrupt_at(6)], **common).train()
    assert (tmp_path / "hf" / "checkpoint-4").is_dir()
    # Resumed from a copy outside output_dir: the warm start travels with the checkpoint.
    import shutil

    shutil.copytree(tmp_path / "hf" / "checkpoint-4", tmp_path / "elsewhere" / "checkpoint-4")
    second = SharpnessCallback(_probe(), every=2, run_dir=tmp_path / "run")
    trainer = _hf_trainer(tmp_path / "hf", [second], **common)
    trainer.train(resume_from_checkpoint=str(tmp_path / "elsewhere" / "checkpoint-4"))
    assert second.resumed_from == 4
    assert second.recorder.monitor.measurements == len(whole.history)
    steps = [r["step"] for r in run_rows(tmp_path / "run")]
    assert steps == sorted(set(steps)) == [r["step"] for r in run_rows(tmp_path / "whole")]
    resumed = {r["step"]: r for r in run_rows(tmp_path / "run")}
    for row in run_rows(tmp_path / "whole"):
        for key in ("sharpness/critical", "sharpness/evals", "train/loss"):
            if key in row:
                assert resumed[row["step"]][key] == pytest.approx(row[key], rel=1e-5), (row["step"], key)


def test_hf_new_run_never_replaces_a_run_in_run_dir_unless_asked(tmp_path):
    pytest.importorskip("transformers")
    from sharpscope.integrations.hf import SharpnessCallback

    _hf_trainer(tmp_path / "hf", [SharpnessCallback(_probe(), every=2, run_dir=tmp_path / "run")],
                max_steps=3).train()
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    again = _hf_trainer(tmp_path / "hf2", [SharpnessCallback(_probe(), every=2, run_dir=tmp_path / "run")],
                        max_steps=3)
    with pytest.raises(ValueError, match="already holds a run .* overwrite=True"):
        again.train()
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before
    replaced = SharpnessCallback(_probe(), every=2, run_dir=tmp_path / "run", name="second", overwrite=True)
    _hf_trainer(tmp_path / "hf3", [replaced], max_steps=2).train()
    assert [r["step"] for r in run_rows(tmp_path / "run")] == [1, 2]
    assert read_run(tmp_path / "run").config["name"] == "second"


def test_hf_callback_serves_a_second_train_call(tmp_path):
    """The same Trainer and callback: train to step 4, then resume to step 8."""
    pytest.importorskip("transformers")
    from sharpscope.integrations.hf import SharpnessCallback

    callback = SharpnessCallback(_probe(), every=2, run_dir=tmp_path / "run")
    trainer = _hf_trainer(tmp_path / "hf", [callback], max_steps=4, save_strategy="steps", save_steps=4)
    trainer.train()
    trainer.args.max_steps = 8
    trainer.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-4"))
    measured = [r["step"] for r in run_rows(tmp_path / "run") if "sharpness/evals" in r]
    assert measured == [1, 2, 4, 6, 8]


def test_hf_exact_references_every_m_steps(tmp_path):
    pytest.importorskip("transformers")
    from sharpscope.integrations.hf import SharpnessCallback

    callback = SharpnessCallback(_probe(), every=2, exact_every=3, lanczos_iters=8, trace_samples=4,
                                 run_dir=tmp_path / "run")
    trainer = _hf_trainer(tmp_path / "hf", [callback], max_steps=6, logging_steps=10)
    trainer.train()
    exact = [row["step"] for row in trainer.state.log_history if "sharpness/lambda_max" in row]
    assert exact == [1, 3, 6]
    with_pre = [row for row in trainer.state.log_history if "sharpness/preconditioned" in row]
    assert [row["step"] for row in with_pre] == [3, 6]  # AdamW has no moments before step 1
    rows = {r["step"]: r for r in run_rows(tmp_path / "run")}
    assert rows[3]["sharpness/lambda_max"] > 0 and rows[3]["sharpness/trace_per_param"] == pytest.approx(
        rows[3]["sharpness/trace"] / read_run(tmp_path / "run").config["n_params"], rel=1e-9)


@pytest.mark.parametrize("kwargs,message", [
    ({"every": 0}, "every must be a positive integer"),
    ({"every": 2.5}, "every must be a positive integer"),
    ({"exact_every": -1}, "exact_every must be 0 (off)"),
    ({"method": "bisect"}, "method must be 'fast' or 'paper'"),
    ({"rtol": 2}, "rtol must be a number in (0, 1)"),
    ({"autocast": "bf16"}, "autocast must be None"),
    ({"exact": ["hessian"]}, "exact must be a list drawn from"),
    ({"exact": None}, "exact must be a list drawn from"),
    ({"evry": 5}, "unknown monitor option 'evry'"),
    ({"group": ""}, "group must be a non-empty label"),
])
def test_callback_options_are_checked_at_construction(kwargs, message):
    """F4: a bad option fails when the callback is made, in one line, not at step 1."""
    pytest.importorskip("transformers")
    pytest.importorskip("lightning.pytorch")
    from sharpscope.integrations.hf import SharpnessCallback as HFCallback
    from sharpscope.integrations.lightning import SharpnessCallback as LightningCallback

    for make in (lambda: HFCallback(_probe(), **kwargs),
                 lambda: LightningCallback((counting_tokens(8),), loss_fn=lambda m, b: m.loss(b), **kwargs)):
        with pytest.raises(ValueError) as info:
            make()
        assert message in str(info.value) and "\n" not in str(info.value)


# ---- Lightning ------------------------------------------------------------------------

def _recording_logger():
    from lightning.pytorch.loggers import Logger

    class Recording(Logger):
        """A real Lightning logger that keeps what it is given."""

        def __init__(self):
            super().__init__()
            self.rows: list[tuple[int, dict]] = []

        @property
        def name(self):
            return "recording"

        @property
        def version(self):
            return 0

        def log_metrics(self, metrics, step=None):
            self.rows.append((step, dict(metrics)))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    return Recording()


def _lightning_train(callback, *, max_steps=6, batch_size=8, logger=False, **trainer_args):
    pl = pytest.importorskip("lightning.pytorch")
    pl.seed_everything(0, verbose=False)
    module = lightning_tiny_lm()()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(counting_tokens()), batch_size=batch_size)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback] if callback else [], **trainer_args)
    trainer.fit(module, loader)
    return module, trainer


def test_lightning_callback_measures_logs_and_does_not_perturb(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from sharpscope.integrations.lightning import SharpnessCallback

    callback = SharpnessCallback((counting_tokens(8, seed=1),), loss_fn=lambda module, batch: module.loss(batch),
                                 every=2, run_dir=tmp_path / "run")
    monitored, trainer = _lightning_train(callback)
    assert [step for step, _ in callback.history] == [0, 2, 4]
    assert math.isfinite(float(trainer.callback_metrics["sharpness/evals"]))
    run = read_run(tmp_path / "run")
    _, lam = run.series("sharpness/critical")
    assert len(lam) == 3
    plain, _ = _lightning_train(None)
    for (name, a), (_, b) in zip(monitored.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name


def test_lightning_every_measurement_reaches_the_logger_at_default_cadence(tmp_path):
    """F3: with log_every_n_steps=50 (the default) all 6 measurements reach the logger."""
    pytest.importorskip("lightning.pytorch")
    from sharpscope.integrations.lightning import SharpnessCallback

    logger = _recording_logger()
    callback = SharpnessCallback((counting_tokens(8, seed=1),), loss_fn=lambda m, b: m.loss(b), every=2,
                                 run_dir=tmp_path / "run")
    _lightning_train(callback, max_steps=12, logger=logger)
    logged = [(step, row) for step, row in logger.rows if "sharpness/evals" in row]
    assert [step for step, _ in logged] == [0, 2, 4, 6, 8, 10]
    for (step, row), (h_step, metrics) in zip(logged, callback.history):
        assert step == h_step and row["sharpness/evals"] == metrics["sharpness/evals"]


def test_lightning_failed_measurement_never_shows_an_old_value(tmp_path):
    """F3: a not_descent measurement logs its failure, no λ_c from an earlier step, and
    the failure flag does not stick to later rows or to callback_metrics."""
    pytest.importorskip("lightning.pytorch")
    from sharpscope.integrations.lightning import SharpnessCallback

    uphill_at = {2, 3}
    state = {"step": 0}
    grads: list[torch.Tensor] = []

    def loss_fn(module, batch):
        if state["step"] not in uphill_at:
            return module.loss(batch)
        # At steps 2 and 3 the probe objective is -⟨θ, g⟩ with g the step's gradient:
        # along the step, -⟨θ − ηd, g⟩ grows as η·dᵀg and AdamW's d agrees with g, so the
        # update is uphill on it (a not_descent by construction).
        return -sum((p * g).sum() for p, g in zip(module.parameters(), grads))

    import lightning.pytorch as pl

    class Track(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            state["step"] = trainer.global_step
            grads[:] = [p.grad.detach().clone() for p in pl_module.parameters()]

    logger = _recording_logger()
    callback = SharpnessCallback((counting_tokens(8, seed=1),), loss_fn=loss_fn, every=1)
    pl.seed_everything(0, verbose=False)
    module = lightning_tiny_lm()()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(counting_tokens()), batch_size=8)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[Track(), callback])
    trainer.fit(module, loader)
    logged = {step: row for step, row in logger.rows if "sharpness/evals" in row}
    assert sorted(logged) == [0, 1, 2, 3, 4, 5]
    for step, row in logged.items():
        if step in uphill_at:
            assert row.get("sharpness/failed/not_descent") == 1.0
            assert "sharpness/critical" not in row
        else:
            assert math.isfinite(row["sharpness/critical"])
            assert not any(k.startswith("sharpness/failed") for k in row)
    assert not any(k.startswith("sharpness/failed") for k in trainer.callback_metrics)
    assert math.isfinite(float(trainer.callback_metrics["sharpness/critical"]))


def test_lightning_run_directory_with_accumulation_has_loss_grad_norm_and_lr(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from sharpscope.integrations.lightning import SharpnessCallback

    callback = SharpnessCallback((counting_tokens(8, seed=1),), loss_fn=lambda m, b: m.loss(b), every=2,
                                 run_dir=tmp_path / "run", group="scales", log_every=1)
    module, trainer = _lightning_train(callback, max_steps=4, batch_size=4, accumulate_grad_batches=2)
    assert [step for step, _ in callback.history] == [0, 2]
    rows = {r["step"]: r for r in run_rows(tmp_path / "run")}
    assert sorted(rows) == [0, 1, 2, 3]
    for row in rows.values():
        assert row["lr"] == pytest.approx(1e-3) and row["train/grad_norm"] > 0
    # Step 0's loss is the mean over its two micro-batches at the initial weights.
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    fresh = lightning_tiny_lm()()
    ids = counting_tokens()
    with torch.no_grad():
        expected = 0.5 * (float(fresh.loss((ids[0:4],))) + float(fresh.loss((ids[4:8],))))
    assert rows[0]["train/loss"] == pytest.approx(expected, rel=1e-6)
    assert read_run(tmp_path / "run").config["group"] == "scales"


def test_lightning_bf16_mixed_probes_run_in_float32(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from sharpscope.integrations.lightning import SharpnessCallback

    dtypes = []

    def loss_fn(module, batch):
        x = batch[0]
        logits = module.gpt(x[:, :-1])
        dtypes.append(logits.dtype)
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), x[:, 1:].reshape(-1))

    callback = SharpnessCallback((counting_tokens(8, seed=1),), loss_fn=loss_fn, every=2, run_dir=tmp_path / "run")
    _lightning_train(callback, max_steps=4, precision="bf16-mixed")
    assert dtypes and set(dtypes) == {torch.float32}
    assert read_run(tmp_path / "run").config["monitor"]["precision"] == "float32"


# ---- a plain loop ---------------------------------------------------------------------

def _tiny_gpt():
    from sharpscope.training.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=1, n_head=2, d_model=16))


def _gpt_loss(model, batch):
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))


def test_monitor_in_a_plain_loop_defers_zero_lr_steps_and_measures_exact_references():
    from sharpscope import SharpnessMonitor, hessian_eigenvalues

    model = _tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 3))  # lr 0 at step 0
    probe = counting_tokens(8, seed=1)
    monitor = SharpnessMonitor(model, _gpt_loss, probe, opt, every=4, exact_every=4, exact=["lambda_max"],
                               lanczos_iters=30)
    data = counting_tokens(64)
    seen = {}
    for step in range(9):
        loss = _gpt_loss(model, data[step * 4:(step + 1) * 4])
        loss.backward()
        expected = None
        if step in (4, 8):
            expected = hessian_eigenvalues(model, _gpt_loss, probe, k=1, max_iter=30, tol=1e-3).values[0]
        with monitor.around_step(step):
            opt.step()
        opt.zero_grad()
        warmup.step()
        if monitor.latest is not None:
            seen[step] = dict(monitor.latest)
        if expected is not None:
            assert seen[step]["sharpness/lambda_max"] == pytest.approx(expected, rel=1e-9)
    assert sorted(seen) == [0, 1, 4, 8]
    assert "sharpness/critical" not in seen[0] and "sharpness/lambda_max" in seen[0]  # lr 0: exact only
    assert seen[1]["sharpness/deferred_from"] == 0 and math.isfinite(seen[1]["sharpness/critical"])
    assert "sharpness/deferred_from" not in seen[4]
    with pytest.raises(ValueError, match="every must be a positive integer"):
        SharpnessMonitor(model, _gpt_loss, probe, opt, every=0)


@pytest.fixture
def fresh_accelerator_state():
    """accelerate keeps one process-wide state; earlier Trainers in this process set it."""
    pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_monitor_in_an_accelerate_loop_with_accumulation_and_bf16(fresh_accelerator_state):
    """A plain accelerate loop: optimizer.step() is called every micro-batch and does
    nothing until the gradients are accumulated; a measurement due on such a micro-step
    waits for the step that moves, and the probes stay in float32 under bf16."""
    accelerate = pytest.importorskip("accelerate")
    from sharpscope import SharpnessMonitor

    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16", gradient_accumulation_steps=2)
    model = _tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = accelerator.prepare(model, opt)
    dtypes = []

    def loss_fn(m, batch):
        logits = m(batch[:, :-1])
        dtypes.append(logits.dtype)
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), batch[:, 1:].reshape(-1))

    monitor = SharpnessMonitor(model, loss_fn, counting_tokens(8, seed=1), opt, every=4)
    data = counting_tokens(64)
    seen = {}
    for step in range(8):
        with accelerator.accumulate(model):
            loss = _gpt_loss(model, data[step * 4:(step + 1) * 4])
            accelerator.backward(loss)
            with monitor.around_step(step):
                opt.step()
            opt.zero_grad()
        if monitor.latest is not None:
            seen[step] = dict(monitor.latest)
    # Steps 0 and 4 are accumulation micro-steps: measured at 1 and 5 instead.
    assert sorted(seen) == [1, 5]
    assert seen[1]["sharpness/deferred_from"] == 0 and seen[5]["sharpness/deferred_from"] == 4
    assert all(math.isfinite(m["sharpness/critical"]) for m in seen.values())
    assert dtypes and set(dtypes) == {torch.float32}


def test_lightning_resume_from_checkpoint_keeps_rows_and_warm_start(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from sharpscope.integrations.lightning import SharpnessCallback

    def fit(run_dir, max_steps, ckpt_dir=None, ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        module = lightning_tiny_lm()()
        # Four batches an epoch, so the checkpoint after step 3 is at an epoch boundary,
        # where Lightning resumes a plain DataLoader exactly.
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(counting_tokens()), batch_size=16)
        callback = SharpnessCallback((counting_tokens(8, seed=1),), loss_fn=lambda m, b: m.loss(b), every=2,
                                     run_dir=run_dir, log_every=1)
        extra = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=4, save_top_k=-1)] if ckpt_dir else []
        trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False,
                             enable_checkpointing=bool(ckpt_dir), enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[callback, *extra])
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return callback

    whole = fit(tmp_path / "whole", 8)
    fit(tmp_path / "run", 6, ckpt_dir=tmp_path / "ckpt")  # stopped after step 5, checkpoint at 4 steps
    (checkpoint,) = sorted((tmp_path / "ckpt").glob("*step=4*.ckpt"))
    resumed = fit(tmp_path / "run", 8, ckpt_path=str(checkpoint))
    assert resumed.recorder.monitor.measurements == len(whole.history)
    rows, reference = run_rows(tmp_path / "run"), run_rows(tmp_path / "whole")
    assert [r["step"] for r in rows] == [r["step"] for r in reference] == list(range(8))
    for row, ref in zip(rows, reference):
        for key in ("sharpness/critical", "sharpness/evals", "train/loss"):
            if key in ref:
                assert row[key] == pytest.approx(ref[key], rel=1e-5), (row["step"], key)


def test_hf_probe_step_measures_on_the_batches_the_step_used(tmp_path):
    # probe="step": no probe batch; the callback takes the training forwards' inputs of each
    # step (all micro-batches under accumulation) and measures along the update on them.
    pytest.importorskip("transformers")
    from sharpscope.integrations.hf import SharpnessCallback

    class Counting(SharpnessCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            self.sizes.append([len(b["input_ids"]) for b in self._micro_batches])
            super().on_pre_optimizer_step(args, state, control, **kwargs)

    callback = Counting(None, every=2, probe="step", run_dir=tmp_path / "run")
    callback.sizes = []
    trainer = _hf_trainer(tmp_path / "hf", [callback], gradient_accumulation_steps=2)
    trainer.train()
    assert callback.sizes == [[8, 8]] * 6  # both micro-batches of every step, nothing else
    assert [step for step, _ in callback.history] == [1, 2, 4, 6]
    for _, m in callback.history:
        assert m["sharpness/descent_step"] > 0  # the update descends on its own batch
        assert "sharpness/critical" in m and m["sharpness/critical_se"] > 0
    assert read_run(tmp_path / "run").config["monitor"]["probe"] == "step"
    # training is not perturbed by the capture
    plain = _hf_trainer(tmp_path / "plain", [], gradient_accumulation_steps=2)
    plain.train()
    for (name, a), (_, b) in zip(trainer.model.state_dict().items(), plain.model.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="probe must be 'fixed' or 'step'"):
        SharpnessCallback(None, probe="next")
    with pytest.raises(ValueError, match="probe_batch is None"):
        SharpnessCallback(None)


def test_lightning_probe_step_measures_on_the_step_batches(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from sharpscope.integrations.lightning import SharpnessCallback

    class Counting(SharpnessCallback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.sizes.append(len(self._micro_batches))
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    callback = Counting(None, loss_fn=lambda module, batch: module.loss(batch), every=2, probe="step",
                        run_dir=tmp_path / "run")
    callback.sizes = []
    _lightning_train(callback, max_steps=4, accumulate_grad_batches=2)
    assert callback.sizes == [2, 2, 2, 2]
    assert len(callback.history) == 2
    for _, m in callback.history:
        assert m["sharpness/descent_step"] > 0 and "sharpness/critical" in m
