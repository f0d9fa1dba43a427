"""Independent ground truth for the curvature tests: dense float64 Hessians, Jacobians and
closed-form least squares, built without any sharpscope code.

The dense Hessian uses torch.autograd.functional.hessian (double backward, one column at
a time). torch.func.hessian is not used for models with LayerNorm: in the torch version
we build against, its vmap-batched second derivative of layer_norm is wrong when the
normalised input also depends on the parameters (the asymmetric result is caught by
`test_dense_reference_agrees_with_finite_differences`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def flat_parameters(model):
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return names, [p.shape for p in params], torch.cat([p.detach().reshape(-1) for p in params])


def unflatten(flat, names, shapes):
    out, i = {}, 0
    for n, s in zip(names, shapes):
        k = s.numel()
        out[n] = flat[i : i + k].reshape(s)
        i += k
    return out


class _Call(torch.nn.Module):
    """Holds ``model`` as a submodule so functional_call can swap its parameters while
    ``fn(model, batch)`` runs unchanged."""

    def __init__(self, model, fn):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch):
        return self.fn(self.model, batch)


def functional_loss(model, loss_fn, batches):
    """L(flat θ) = mean over batches of loss_fn(model, batch), as a pure function."""
    names, shapes, flat0 = flat_parameters(model)
    caller = _Call(model, loss_fn)

    def f(flat):
        params = {"model." + k: v for k, v in unflatten(flat, names, shapes).items()}
        total = 0.0
        for b in batches:
            total = total + torch.func.functional_call(caller, params, (b,), strict=False)
        return total / len(batches)

    return f, flat0


def dense_hessian(model, loss_fn, batches) -> torch.Tensor:
    f, flat0 = functional_loss(model, loss_fn, batches)
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.functional.hessian(f, flat0)


def dense_gradient(model, loss_fn, batches) -> torch.Tensor:
    f, flat0 = functional_loss(model, loss_fn, batches)
    x = flat0.clone().requires_grad_(True)
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.grad(f(x), x)[0]


def dense_ggn(model, forward_fn, batches) -> torch.Tensor:
    """Mean over batches of Jᵀ (∇²_z CE) J, with J the Jacobian of the logits."""
    names, shapes, flat0 = flat_parameters(model)
    caller = _Call(model, forward_fn)
    total = torch.zeros(flat0.numel(), flat0.numel(), dtype=flat0.dtype)
    for b in batches:
        targets = b[1].reshape(-1)

        def logits_of(flat):
            params = {"model." + k: v for k, v in unflatten(flat, names, shapes).items()}
            return torch.func.functional_call(caller, params, (b,), strict=False).reshape(-1)

        with sdpa_kernel([SDPBackend.MATH]):
            z0 = logits_of(flat0).detach()
            J = torch.autograd.functional.jacobian(logits_of, flat0)
        V = z0.numel() // targets.numel()

        def ce(z):
            return F.cross_entropy(z.reshape(-1, V), targets)

        Hz = torch.autograd.functional.hessian(ce, z0)
        total += J.T @ Hz @ J
    return total / len(batches)


def to_flat(vectors) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in vectors])


def split_like(flat, like):
    out, i = [], 0
    for p in like:
        k = p.numel()
        out.append(flat[i : i + k].reshape(p.shape).to(p.dtype))
        i += k
    return out


# ---- models -----------------------------------------------------------------------------

def least_squares_problem(seed=0, n_samples=64, n_features=10):
    """Linear least squares L(w) = ½·mean((Xw − y)²): H = XᵀX/N exactly, g = Hw − Xᵀy/N."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n_samples, n_features, generator=gen, dtype=torch.float64)
    X = X * torch.linspace(0.3, 3.0, n_features, dtype=torch.float64)  # a spread spectrum
    y = torch.randn(n_samples, 1, generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(n_features, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, n_features, generator=gen, dtype=torch.float64))
    H = X.T @ X / n_samples
    w = model.weight.detach().reshape(-1)
    g = H @ w - X.T @ y.reshape(-1) / n_samples
    return model, (X, y), H, g


def least_squares_loss(model, batch):
    x, t = batch
    return 0.5 * ((model(x) - t) ** 2).mean()


def cross_entropy_loss(model, batch):
    x, t = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1))


def logits_forward(model, batch):
    return model(batch[0])


def tiny_mlp(seed=0, n_in=5, hidden=7, n_out=4):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, n_out)
    ).double()


def mlp_batches(seed=0, n_in=5, n_out=4, n=12, count=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, n_in, generator=gen, dtype=torch.float64), torch.randint(0, n_out, (n,), generator=gen))
        for _ in range(count)
    ]


def tiny_transformer(seed=0, vocab=8, block=4):
    from sharpscope.training.model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab, block_size=block, n_layer=1, n_head=2, d_model=4, mlp_ratio=2))
    # Larger weights than GPT init, so the curvature is not dominated by the embedding.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.double()


def token_batches(seed=0, vocab=8, block=4, n=3, count=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, vocab, (n, block), generator=gen), torch.randint(0, vocab, (n, block), generator=gen))
        for _ in range(count)
    ]
