"""The stability guard (``guard=``) of both callbacks inside the real frameworks, offline: a
tiny randomly initialised GPT-2 in a real ``transformers.Trainer`` and a tiny module in a
real ``lightning.Trainer``, the monitor measuring every step and the guard set so that
its alarm fires (a threshold far below any lr/η_c these runs reach).

* warn: the alarm is logged (``stability/alarm`` = 1, one warning line when it begins)
  and training is bit-identical to the same run without the guard;
* cap: the lr the optimizer applies is the scheduler's times ``stability/lr_scale`` once
  per optimizer step (gradient accumulation included), the parameters differ from the
  uncapped run, and the scheduler's own lrs are put back after every step, so a
  chainable scheduler (ExponentialLR) ends where the uncapped run's does; the run
  directory's ``lr`` is the lr applied in both (HF's own log keeps the scheduler's); HF's
  warmup from lr 0 neither crashes nor writes a non-finite ratio;
* stop: HF ends early with ``control.should_training_stop`` and a checkpoint of the
  stopping step (none with ``save_strategy="no"``), Lightning sets ``trainer.should_stop``;
* a bad guard option fails when either callback is made, in one line.

The lr a step applied is read by a step post-hook on the torch optimizer registered
before the monitor's (hooks run in registration order), so it sees the group's lr before
the monitor puts the scheduler's value back."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from support.tiny_lm import BLOCK, VOCAB, counting_tokens, lightning_tiny_lm
from support.training import run_rows

ALARM = {"threshold": 1e-6, "patience": 1}  # every reading is far above: the alarm fires at once
GUARD_LOGGER = "sharpscope.guard"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these models are too small to gain from more, and the runs stay
    fast on a machine whose cores are busy. The count is put back afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _measured(rows):
    return {r["step"]: r for r in rows if "sharpness/evals" in r}


def _record_applied_lrs(optimizer, into: list) -> None:
    """Each optimizer step's lr as the step applied it (this post-hook runs before the
    monitor's, which is registered at the first cut)."""
    optimizer.register_step_post_hook(lambda opt, *_: into.append(opt.param_groups[0]["lr"]))


def _scale_in_effect(measured: dict, step: int) -> float:
    """The cap's factor at ``step``: ``stability/lr_scale`` of the latest measurement before it."""
    earlier = [s for s in measured if s < step and "stability/lr_scale" in measured[s]]
    return measured[max(earlier)]["stability/lr_scale"] if earlier else 1.0


def _guard_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.name == GUARD_LOGGER]


def _assert_rows_carry_the_applied_lr(rows: list[dict], applied: dict[int, float]) -> None:
    """The run directory's ``lr`` is the lr the step applied (schedule × scale), as the
    trainer's is under a cap: ``lr_over_eta_c`` = lr/eta_c and ``two_over_lr`` = 2/lr hold
    on every row, which the analysis reads (lr/η_c, λ_c·lr/2)."""
    by_step = {r["step"]: r for r in rows}
    for step, lr in applied.items():
        row = by_step[step]
        if lr == 0:
            assert "lr" not in row, step
            continue
        assert row["lr"] == pytest.approx(lr, rel=1e-12), step
        if "sharpness/two_over_lr" in row:
            assert row["sharpness/two_over_lr"] == pytest.approx(2 / row["lr"], rel=1e-12), step


# ---- Hugging Face ---------------------------------------------------------------------

def _hf_train(out, guard, *, chainable=False, lr=1e-2, **overrides):
    """A tiny GPT-2 trained by a real Trainer with the callback (every step) and ``guard``;
    ``chainable`` hands the Trainer an AdamW with ExponentialLR (a scheduler that reads the
    group's lr). Returns (trainer, scheduler, applied lrs, run directory)."""
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import Dataset

    from sharpscope.integrations.hf import SharpnessCallback

    class Tokens(Dataset):
        ids = counting_tokens(64)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class RecordLrs(transformers.TrainerCallback):
        def __init__(self):
            self.applied: list[float] = []

        def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
            if not chainable:  # the Trainer's own optimizer exists from here on
                _record_applied_lrs(getattr(optimizer, "optimizer", optimizer), self.applied)

    transformers.set_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    record = RecordLrs()
    optimizers = (None, None)
    if chainable:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        optimizers = (opt, torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8))
        _record_applied_lrs(opt, record.applied)
    run_dir = out / "run"
    ids = counting_tokens(8, seed=1)
    callback = SharpnessCallback({"input_ids": ids, "labels": ids}, every=1, run_dir=run_dir, guard=guard)
    settings = dict(output_dir=str(out / "hf"), max_steps=6, per_device_train_batch_size=8, logging_steps=1,
                    report_to=[], use_cpu=True, save_strategy="no", learning_rate=lr, disable_tqdm=True, seed=0)
    settings.update(overrides)
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**settings),
                                   train_dataset=Tokens(), callbacks=[callback, record], optimizers=optimizers)
    trainer.train()
    return trainer, optimizers[1] or trainer.lr_scheduler, record.applied, run_dir


def _same_parameters(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_hf_warn_logs_the_alarm_and_leaves_training_bit_identical(tmp_path, caplog):
    pytest.importorskip("transformers")
    with caplog.at_level(logging.WARNING, logger=GUARD_LOGGER):
        warned, _, _, run_dir = _hf_train(tmp_path / "warn", {"action": "warn", **ALARM})
    plain, _, _, plain_dir = _hf_train(tmp_path / "plain", None)
    rows, plain_rows = _measured(run_rows(run_dir)), _measured(run_rows(plain_dir))
    assert sorted(rows) == sorted(plain_rows) == [1, 2, 3, 4, 5, 6]
    assert any(r.get("stability/alarm") == 1 for r in rows.values()), "the alarm fired"
    assert all("stability/lr_scale" not in r for r in rows.values())
    assert len(_guard_warnings(caplog)) == 1, "one line when the alarm begins"
    assert _same_parameters(warned.model, plain.model)
    for step, row in plain_rows.items():  # the same measurements too
        assert {k: v for k, v in rows[step].items() if not k.startswith("stability/")} == row


def test_hf_cap_with_accumulation_scales_each_optimizer_step_and_never_compounds_the_scheduler(tmp_path):
    pytest.importorskip("transformers")
    common = dict(chainable=True, max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    capped, sched, applied, run_dir = _hf_train(
        tmp_path / "cap", {"action": "cap", "min_scale": 0.2, **ALARM}, **common)
    plain, plain_sched, scheduled, _ = _hf_train(tmp_path / "plain", None, **common)
    # One lr per optimizer step (not per micro-batch), the scheduler's uncapped ones decaying.
    assert len(applied) == len(scheduled) == 6
    assert scheduled == pytest.approx([1e-2 * 0.8 ** k for k in range(6)], rel=1e-12)
    rows = _measured(run_rows(run_dir))
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert any(r["stability/lr_scale"] < 1 for r in rows.values())
    for step in range(1, 7):  # HF counts optimizer steps from 1
        expected = scheduled[step - 1] * _scale_in_effect(rows, step)
        assert applied[step - 1] == pytest.approx(expected, rel=1e-12), step
        # The guard judged the lr the step applied.
        row = rows[step]
        assert row["sharpness/lr_over_eta_c"] * row["sharpness/eta_c"] == pytest.approx(applied[step - 1],
                                                                                          rel=1e-9)
    assert min(applied[k] / scheduled[k] for k in range(6)) < 1
    _assert_rows_carry_the_applied_lr(run_rows(run_dir), {k + 1: lr for k, lr in enumerate(applied)})
    # HF's own log keeps the scheduler's lr (docs/integrations.md).
    logged = [e["learning_rate"] for e in capped.state.log_history if "learning_rate" in e]
    assert logged == scheduled
    assert not _same_parameters(capped.model, plain.model)
    # The scheduler never saw the scale: it ends where the uncapped one does, and so do the groups.
    assert sched.get_last_lr() == plain_sched.get_last_lr()
    assert [g["lr"] for g in capped.optimizer.param_groups] == [g["lr"] for g in plain.optimizer.param_groups]


def test_hf_cap_through_a_warmup_from_lr_zero(tmp_path):
    pytest.importorskip("transformers")
    common = dict(max_steps=8, warmup_steps=4, lr_scheduler_type="linear")
    capped, sched, applied, run_dir = _hf_train(tmp_path / "cap", {"action": "cap", "min_scale": 0.2, **ALARM},
                                                **common)
    plain, plain_sched, scheduled, _ = _hf_train(tmp_path / "plain", None, **common)
    assert scheduled[0] == 0.0 and applied[0] == 0.0 and len(applied) == 8
    all_rows = run_rows(run_dir)
    rows = _measured(all_rows)
    # Step 1 (lr 0) has no direction: its measurement, and the guard's first reading, is step 2's.
    assert sorted(rows) == [2, 3, 4, 5, 6, 7, 8]
    assert rows[2]["sharpness/deferred_from"] == 1
    for row in all_rows:  # finite, or null (an infinite ratio: η̄ = 0) as the docs say
        for key in ("stability/ratio", "stability/ratio_lower", "stability/lr_scale"):
            if key in row:
                assert row[key] is None or math.isfinite(row[key]), (row["step"], key)
    assert all(r["stability/alarm"] == 1 for r in rows.values())
    assert any(r["stability/lr_scale"] < 1 for r in rows.values())
    for step in range(1, 9):
        assert applied[step - 1] == pytest.approx(scheduled[step - 1] * _scale_in_effect(rows, step), rel=1e-12)
    _assert_rows_carry_the_applied_lr(all_rows, {k + 1: lr for k, lr in enumerate(applied)})
    assert not _same_parameters(capped.model, plain.model)
    assert sched.get_last_lr() == plain_sched.get_last_lr()


def test_hf_stop_ends_training_early_with_a_checkpoint_of_the_stopping_step(tmp_path, caplog):
    pytest.importorskip("transformers")
    stop = {"action": "stop", "threshold": 1e-6, "patience": 2}
    with caplog.at_level(logging.WARNING, logger=GUARD_LOGGER):
        trainer, _, applied, run_dir = _hf_train(tmp_path / "saved", stop, max_steps=8, save_strategy="steps",
                                                 save_steps=100)
    stopped = trainer.state.global_step
    assert stopped < 8 and len(applied) == stopped
    assert trainer.control.should_training_stop
    rows = _measured(run_rows(run_dir))
    assert [s for s, r in rows.items() if r.get("stability/stop") == 1] == [stopped]
    assert max(rows) == stopped
    assert any("stopping the run" in m for m in _guard_warnings(caplog))
    checkpoints = sorted(p.name for p in (tmp_path / "saved" / "hf").glob("checkpoint-*"))
    assert checkpoints == [f"checkpoint-{stopped}"]
    state = json.loads((tmp_path / "saved" / "hf" / checkpoints[0] / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["sharpscope.SharpnessMonitor"]["guard"]["stopped"] is True

    unsaved, _, _, _ = _hf_train(tmp_path / "unsaved", stop, max_steps=8, save_strategy="no")
    assert unsaved.state.global_step == stopped
    assert not list((tmp_path / "unsaved" / "hf").glob("checkpoint-*"))


# ---- Lightning ------------------------------------------------------------------------

def _lightning_train(tmp_path, guard, *, chainable=False, max_steps=6, batch_size=8, lr=1e-2, **trainer_args):
    """A tiny GPT trained by a real lightning Trainer with the callback (every step) and
    ``guard``; ``chainable`` adds ExponentialLR stepped every optimizer step. Returns
    (module, trainer, applied lrs, run directory)."""
    pl = pytest.importorskip("lightning.pytorch")
    from sharpscope.integrations.lightning import SharpnessCallback

    class TinyLM(lightning_tiny_lm()):
        def __init__(self):
            super().__init__(lr)
            self.applied: list[float] = []
            self.scheduler = None

        def configure_optimizers(self):
            opt = super().configure_optimizers()
            _record_applied_lrs(opt, self.applied)
            if not chainable:
                return opt
            self.scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.8)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": self.scheduler, "interval": "step"}}

    pl.seed_everything(0, verbose=False)
    module = TinyLM()
    run_dir = tmp_path / "run"
    callback = SharpnessCallback((counting_tokens(8, seed=1),), loss_fn=lambda m, b: m.loss(b), every=1, run_dir=run_dir,
                                 guard=guard)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(counting_tokens()), batch_size=batch_size)
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         **trainer_args)
    trainer.fit(module, loader)
    return module, trainer, module.applied, run_dir


def test_lightning_warn_logs_the_alarm_and_leaves_training_bit_identical(tmp_path, caplog):
    pytest.importorskip("lightning.pytorch")
    with caplog.at_level(logging.WARNING, logger=GUARD_LOGGER):
        warned, _, _, run_dir = _lightning_train(tmp_path / "warn", {"action": "warn", **ALARM})
    plain, _, _, plain_dir = _lightning_train(tmp_path / "plain", None)
    rows, plain_rows = _measured(run_rows(run_dir)), _measured(run_rows(plain_dir))
    assert sorted(rows) == sorted(plain_rows) == [0, 1, 2, 3, 4, 5]
    assert any(r.get("stability/alarm") == 1 for r in rows.values()), "the alarm fired"
    assert len(_guard_warnings(caplog)) == 1
    assert _same_parameters(warned, plain)
    for step, row in plain_rows.items():
        assert {k: v for k, v in rows[step].items() if not k.startswith("stability/")} == row


def test_lightning_cap_with_accumulation_scales_each_optimizer_step_and_never_compounds_the_scheduler(tmp_path):
    pytest.importorskip("lightning.pytorch")
    common = dict(chainable=True, max_steps=6, batch_size=4, accumulate_grad_batches=2)
    capped, trainer, applied, run_dir = _lightning_train(
        tmp_path / "cap", {"action": "cap", "min_scale": 0.2, **ALARM}, **common)
    plain, plain_trainer, scheduled, _ = _lightning_train(tmp_path / "plain", None, **common)
    assert trainer.global_step == plain_trainer.global_step == 6
    assert len(applied) == len(scheduled) == 6  # once per optimizer step, not per micro-batch
    assert scheduled == pytest.approx([1e-2 * 0.8 ** k for k in range(6)], rel=1e-12)
    rows = _measured(run_rows(run_dir))
    assert sorted(rows) == [0, 1, 2, 3, 4, 5]
    assert any(r["stability/lr_scale"] < 1 for r in rows.values())
    for step in range(6):  # Lightning counts optimizer steps from 0
        assert applied[step] == pytest.approx(scheduled[step] * _scale_in_effect(rows, step), rel=1e-12), step
        row = rows[step]
        assert row["sharpness/lr_over_eta_c"] * row["sharpness/eta_c"] == pytest.approx(applied[step], rel=1e-9)
    assert min(a / s for a, s in zip(applied, scheduled)) < 1
    _assert_rows_carry_the_applied_lr(run_rows(run_dir), dict(enumerate(applied)))
    assert not _same_parameters(capped, plain)
    assert capped.scheduler.get_last_lr() == plain.scheduler.get_last_lr()
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == \
        [g["lr"] for g in plain_trainer.optimizers[0].param_groups]


def test_lightning_stop_sets_should_stop_and_ends_early(tmp_path, caplog):
    pytest.importorskip("lightning.pytorch")
    with caplog.at_level(logging.WARNING, logger=GUARD_LOGGER):
        _, trainer, applied, run_dir = _lightning_train(
            tmp_path, {"action": "stop", "threshold": 1e-6, "patience": 2}, max_steps=8)
    assert trainer.should_stop
    rows = _measured(run_rows(run_dir))
    stops = [s for s, r in rows.items() if r.get("stability/stop") == 1]
    assert len(stops) == 1 and max(rows) == stops[0]
    # The stopping step (counted from 0) was the last one taken.
    assert trainer.global_step == stops[0] + 1 < 8 and len(applied) == trainer.global_step
    assert any("stopping the run" in m for m in _guard_warnings(caplog))


# ---- options --------------------------------------------------------------------------

@pytest.mark.parametrize("guard, message", [
    ({"action": "cap", "patience": 0}, "guard patience must be a positive integer, not 0"),
    ({"action": "stop", "treshold": 2}, "unknown guard option 'treshold'"),
    ("panic", "guard action must be one of"),
    ({"cap_factor": 1.5}, "guard cap_factor must be"),
])
def test_a_bad_guard_option_fails_when_either_callback_is_made(guard, message):
    pytest.importorskip("transformers")
    pytest.importorskip("lightning.pytorch")
    from sharpscope.integrations.hf import SharpnessCallback as HFCallback
    from sharpscope.integrations.lightning import SharpnessCallback as LightningCallback

    ids = counting_tokens(8)
    for make in (lambda: HFCallback({"input_ids": ids, "labels": ids}, guard=guard),
                 lambda: LightningCallback((ids,), loss_fn=lambda m, b: m.loss(b), guard=guard)):
        with pytest.raises(ValueError) as info:
            make()
        assert message in str(info.value) and "\n" not in str(info.value)
