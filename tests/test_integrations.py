"""The Hugging Face and Lightning callbacks, offline: a tiny randomly initialised GPT-2 and
a tiny Lightning module on random tokens. Each measures on its cadence, logs through the
framework, writes a readable run, and leaves training bit-identical."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sharpscope.runs import read_run

VOCAB, BLOCK = 64, 16


def _tokens(n=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, BLOCK), generator=gen)


# ---- Hugging Face ---------------------------------------------------------------------

def _hf_train(tmp_path, callback):
    transformers = pytest.importorskip("transformers")
    from torch.utils.data import Dataset

    class Tokens(Dataset):
        def __init__(self):
            self.ids = _tokens()

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    transformers.set_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=16, n_layer=1, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=6, per_device_train_batch_size=8, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-3, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                   callbacks=[callback] if callback else [])
    trainer.train()
    return model, trainer


def test_hf_callback_measures_logs_and_does_not_perturb(tmp_path):
    pytest.importorskip("transformers")
    from sharpscope.integrations.hf import SharpnessCallback

    probe = {"input_ids": _tokens(8, seed=1), "labels": _tokens(8, seed=1)}
    callback = SharpnessCallback(probe, every=2, run_dir=tmp_path / "run", name="gpt2-tiny")
    monitored, trainer = _hf_train(tmp_path, callback)
    assert [step for step, _ in callback.history] == [0, 2, 4]
    for _, metrics in callback.history:
        assert metrics["sharpness/evals"] >= 2
    logged = [row for row in trainer.state.log_history if "sharpness/critical" in row or "sharpness/evals" in row]
    assert len(logged) == 3
    run = read_run(tmp_path / "run")
    assert run.config["source"] == "measured"
    _, loss = run.series("train/loss")
    assert len(loss) == 6
    plain, _ = _hf_train(tmp_path / "plain", None)
    for (name, a), (_, b) in zip(monitored.state_dict().items(), plain.state_dict().items()):
        assert torch.equal(a, b), name


# ---- Lightning ------------------------------------------------------------------------

def _lightning_train(callback):
    pl = pytest.importorskip("lightning.pytorch")
    from sharpscope.training.model import GPT, GPTConfig

    class TinyLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.gpt = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=1, n_head=2, d_model=16))

        def loss(self, batch):
            x = batch[0]
            logits = self.gpt(x[:, :-1])
            return F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))

        def training_step(self, batch, batch_idx):
            return self.loss(batch)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    pl.seed_everything(0, verbose=False)
    module = TinyLM()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(_tokens()), batch_size=8)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback] if callback else [])
    trainer.fit(module, loader)
    return module, trainer


def test_lightning_callback_measures_logs_and_does_not_perturb(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from sharpscope.integrations.lightning import SharpnessCallback

    callback = SharpnessCallback((_tokens(8, seed=1),), loss_fn=lambda module, batch: module.loss(batch),
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
