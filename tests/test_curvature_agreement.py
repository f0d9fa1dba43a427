"""gradient_agreement against gradients computed directly with autograd, and state safety."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sharpscope.curvature.agreement import gradient_agreement
from sharpscope.training.model import GPT, GPTConfig


def loss_fn(model, batch):
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def direct_gradient(model, batches):
    model.zero_grad(set_to_none=True)
    loss = sum(loss_fn(model, b) for b in batches) / len(batches)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=8, n_layer=1, n_head=2, d_model=16, dropout=0.1)).double()
    gen = torch.Generator().manual_seed(1)

    def batch(low, high):
        x = torch.randint(low, high, (4, 9), generator=gen)
        return x[:, :-1], x[:, 1:]

    sources = {"low": [batch(0, 16), batch(0, 16)], "high": batch(16, 32), "all": [batch(0, 32)]}
    return model, sources


def test_cosines_match_direct_autograd(setup):
    model, sources = setup
    result = gradient_agreement(model, loss_fn, sources)
    model.eval()
    direct = {name: direct_gradient(model, b if isinstance(b, list) else [b]) for name, b in sources.items()}
    for (a, b), cos in result.cosines.items():
        want = float(F.cosine_similarity(direct[a], direct[b], dim=0))
        assert cos == pytest.approx(want, rel=1e-10, abs=1e-12), (a, b)
    assert set(result.cosines) == {("all", "high"), ("all", "low"), ("high", "low")}
    for name, g in direct.items():
        assert result.norms[name] == pytest.approx(float(g.norm()), rel=1e-10)
    assert result.mean_cosine == pytest.approx(sum(result.cosines.values()) / 3)
    metrics = result.as_metrics()
    assert metrics["grad_cosine/high~low"] == result.cosines[("high", "low")] and "grad_cosine/mean" in metrics
    # Disjoint token ranges pull apart more than a source and the mixture containing it.
    assert result.cosines[("all", "low")] > result.cosines[("high", "low")]


def test_leaves_the_model_exactly_as_it_was(setup):
    model, sources = setup
    model.train()
    loss_fn(model, sources["high"]).backward()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    gradient_agreement(model, loss_fn, sources)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
    assert torch.equal(rng, torch.get_rng_state())


def test_one_source_has_no_pairs(setup):
    model, sources = setup
    result = gradient_agreement(model, loss_fn, {"high": sources["high"]})
    assert result.cosines == {} and math.isnan(result.mean_cosine) and result.as_metrics() == {}
    with pytest.raises(ValueError):
        gradient_agreement(model, loss_fn, {})
