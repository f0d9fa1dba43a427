"""The tiny language-model set-up the callback tests share: counting sequences and a
Lightning module around a one-layer GPT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

VOCAB, BLOCK = 64, 16


def counting_tokens(n: int = 64, seed: int = 0) -> torch.Tensor:
    """Sequences that count up modulo VOCAB by 1, 2 or 3 from a random start: learnable,
    so an update made on one batch descends on another batch of the same kind."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    stride = torch.randint(1, 4, (n, 1), generator=gen)
    return (start + stride * torch.arange(BLOCK)) % VOCAB


def lightning_tiny_lm():
    """The class of a LightningModule around a one-layer GPT of VOCAB and BLOCK, trained
    with AdamW at ``lr`` (its constructor's argument); skips the test without lightning."""
    pl = pytest.importorskip("lightning.pytorch")
    from sharpscope.training.model import GPT, GPTConfig

    class TinyLM(pl.LightningModule):
        def __init__(self, lr: float = 1e-3):
            super().__init__()
            self.lr = lr
            self.gpt = GPT(GPTConfig(vocab_size=VOCAB, block_size=BLOCK, n_layer=1, n_head=2, d_model=16))

        def loss(self, batch):
            x = batch[0]
            logits = self.gpt(x[:, :-1])
            return F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))

        def training_step(self, batch, batch_idx):
            return self.loss(batch)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=self.lr)

    return TinyLM
