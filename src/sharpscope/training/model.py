"""A GPT decoder small enough to hold in your head.

Pre-norm residual blocks (LayerNorm → causal self-attention, LayerNorm → GeLU MLP), learned
absolute positions or rotary embeddings (RoPE), and an output head tied to the token
embedding. Attention goes through ``F.scaled_dot_product_attention``; curvature products
switch it to the math kernel themselves (the fused kernels have no double backward).

Shapes carry suffixes: B batch, T time, C width, H heads, D head width, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPTConfig", "GPT", "PRESETS", "count_parameters"]

# (n_layer, n_head, d_model): a ladder from about 50K to over 100M parameters with the
# byte-level vocabulary (counts are computed from the built model, never assumed).
PRESETS: dict[str, tuple[int, int, int]] = {
    "nano": (1, 2, 48),
    "tiny": (2, 4, 64),
    "mini": (4, 4, 128),
    "small": (6, 8, 256),
    "medium": (8, 8, 512),
    "large": (16, 12, 768),
}


@dataclass
class GPTConfig:
    vocab_size: int = 256
    """Tokens in the vocabulary (256 for the byte-level tokenizer)."""
    block_size: int = 128
    """Longest context in tokens."""
    n_layer: int = 2
    """Transformer blocks."""
    n_head: int = 2
    """Attention heads per block; must divide d_model."""
    d_model: int = 64
    """Residual stream width."""
    mlp_ratio: int = 4
    """MLP hidden width as a multiple of d_model."""
    dropout: float = 0.0
    """Dropout on attention weights and residual branches during training."""
    bias: bool = True
    """Biases in linear layers and LayerNorms."""
    positions: str = "learned"
    """'learned' absolute position embeddings or 'rope' rotary embeddings."""
    tie_embeddings: bool = True
    """Share the token embedding with the output head."""

    def __post_init__(self):
        if self.d_model % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide d_model ({self.d_model})")
        if self.positions not in ("learned", "rope"):
            raise ValueError(f"positions must be 'learned' or 'rope', not {self.positions!r}")
        if self.positions == "rope" and (self.d_model // self.n_head) % 2:
            raise ValueError("rope needs an even head width (d_model / n_head)")


def _rope_tables(T: int, D: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D))
    angles_TxD2 = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv_freq)
    return angles_TxD2.cos().to(dtype), angles_TxD2.sin().to(dtype)


def _apply_rope(x_BxHxTxD: torch.Tensor, cos_TxD2: torch.Tensor, sin_TxD2: torch.Tensor):
    x1, x2 = x_BxHxTxD[..., 0::2], x_BxHxTxD[..., 1::2]
    rotated = torch.stack((x1 * cos_TxD2 - x2 * sin_TxD2, x1 * sin_TxD2 + x2 * cos_TxD2), dim=-1)
    return rotated.flatten(-2)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.rope = cfg.positions == "rope"
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BxTxC: torch.Tensor) -> torch.Tensor:
        B, T, C = x_BxTxC.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = self.qkv(x_BxTxC).split(C, dim=2)
        q_BxHxTxD, k_BxHxTxD, v_BxHxTxD = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))
        if self.rope:
            cos, sin = _rope_tables(T, D, x_BxTxC.device, q_BxHxTxD.dtype)
            q_BxHxTxD, k_BxHxTxD = _apply_rope(q_BxHxTxD, cos, sin), _apply_rope(k_BxHxTxD, cos, sin)
        y_BxHxTxD = F.scaled_dot_product_attention(
            q_BxHxTxD, k_BxHxTxD, v_BxHxTxD, is_causal=True,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y_BxTxC = y_BxHxTxD.transpose(1, 2).reshape(B, T, C)
        return self.resid_drop(self.proj(y_BxTxC))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.down = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BxTxC: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.gelu(self.up(x_BxTxC))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_attn = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_mlp = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x_BxTxC: torch.Tensor) -> torch.Tensor:
        x_BxTxC = x_BxTxC + self.attn(self.ln_attn(x_BxTxC))
        return x_BxTxC + self.mlp(self.ln_mlp(x_BxTxC))


class GPT(nn.Module):
    """``model(idx_BxT)`` returns logits B×T×V."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # Residual projections scaled down with depth (GPT-2), so the stream's variance
        # does not grow with the number of blocks.
        for name, p in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx_BxT: torch.Tensor) -> torch.Tensor:
        B, T = idx_BxT.shape
        if T > self.cfg.block_size:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.cfg.block_size}")
        x_BxTxC = self.tok_emb(idx_BxT)
        if self.pos_emb is not None:
            x_BxTxC = x_BxTxC + self.pos_emb(torch.arange(T, device=idx_BxT.device))
        x_BxTxC = self.drop(x_BxTxC)
        for block in self.blocks:
            x_BxTxC = block(x_BxTxC)
        return self.head(self.ln_out(x_BxTxC))


def count_parameters(model: nn.Module, *, non_embedding: bool = False) -> int:
    """Distinct parameters (tied weights counted once); optionally without embeddings."""
    total = sum(p.numel() for p in model.parameters())
    if non_embedding and isinstance(model, GPT):
        total -= model.tok_emb.weight.numel()
        if model.pos_emb is not None:
            total -= model.pos_emb.weight.numel()
    return total
