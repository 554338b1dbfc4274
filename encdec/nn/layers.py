"""Feed-forward block, positional encodings, and token embeddings with positions added."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from encdec.nn.dropout import Dropout


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, activation: str = "relu", dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        # ReLU in place on fc1's fresh output (addmm does not keep it for its backward)
        self.act = F.relu_ if activation == "relu" else F.gelu
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # On rows (..., d) flattened to 2-D: fc1's output is then addmm's own tensor, not a
        # view of it, and an in-place op on a view would make autograd copy the hidden
        # activations and their gradient (CopySlices), three to five copies per block.
        h = self.act(self.fc1(x.reshape(-1, x.size(-1))))
        return self.fc2(self.dropout(h)).view(*x.shape[:-1], -1)


def sinusoidal_table(length: int, d_model: int) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(...) (Vaswani et al., 3.5)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)[:, : d_model // 2]
    return table


class Positions(nn.Module):
    """Position vectors for positions offset .. offset+T-1: fixed sinusoids or learned."""

    def __init__(self, kind: str, d_model: int, max_positions: int):
        super().__init__()
        self.kind = kind
        self.d_model = d_model
        self.max_positions = max_positions
        if kind == "learned":
            self.table = nn.Embedding(max_positions, d_model)
            nn.init.normal_(self.table.weight, std=d_model ** -0.5)
        else:
            self.register_buffer("table", sinusoidal_table(max_positions, d_model), persistent=False)

    def forward(self, length: int, offset: int = 0) -> torch.Tensor:
        end = offset + length
        if self.kind == "learned":
            if end > self.max_positions:
                raise ValueError(f"sequence of {end} positions exceeds model.max_positions="
                                 f"{self.max_positions} (learned positions)")
            return self.table.weight[offset:end]
        if end > self.table.size(0):  # sinusoids extend to any length
            self.table = sinusoidal_table(max(end, 2 * self.table.size(0)), self.d_model).to(self.table)
        return self.table[offset:end]  # (T, d)


class Embedding(nn.Module):
    """Token embedding scaled by sqrt(d_model), plus positions, then dropout."""

    def __init__(self, vocab_size: int, d_model: int, positions: Positions, dropout: float,
                 padding_idx: int = 0):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        nn.init.normal_(self.tokens.weight, std=d_model ** -0.5)
        with torch.no_grad():
            self.tokens.weight[padding_idx].zero_()
        self.scale = math.sqrt(d_model)
        self.positions = positions
        self.dropout = Dropout(dropout)

    def forward(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.tokens(tokens) * self.scale + self.positions(tokens.size(1), offset)  # (B, T, d)
        return self.dropout(x)
