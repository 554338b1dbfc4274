"""Multi-head attention on top of ``F.scaled_dot_product_attention`` with a key/value cache.

Projections live here; the kernel is PyTorch's, so the fastest implementation for the device
(flash / memory-efficient / CPU flash) is chosen for us, except on the CPU for short key
sequences (``EXPLICIT_MAX_KEYS``), where the plain product, softmax and product are faster.
Self-attention can rotate queries and keys by position first (``rotary``, see
``encdec/nn/rotary.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encdec.nn.rotary import Rotary

# On the CPU, up to this many keys the explicit attention (two batched products and a softmax)
# is faster than SDPA's CPU flash kernel, forward and backward: 1.7-1.9x at 8-12 keys, 1.1-1.4x
# at 16-48, even at 96 and 0.9x at 160, on a 2-core AMD EPYC at 4,000 tokens per batch
# (`python benchmarks/attention_kernels.py`). G2P words and many subword sentences are this short.
# Incremental decoding always takes the explicit path on the CPU (a handful of queries).
EXPLICIT_MAX_KEYS = 48


@dataclass
class KVCache:
    """The keys and values one attention layer keeps between decoding steps.

    Self-attention appends each step's keys and values (``append``); cross-attention holds the
    encoder output's, projected once per input (``MultiHeadAttention.project_memory``).
    """

    k: torch.Tensor | None = None  # (N, nh, t, hd): t steps so far, or the S memory positions
    v: torch.Tensor | None = None  # (N, nh, t, hd)

    @property
    def length(self) -> int:
        """Positions held (0 before the first step)."""
        return 0 if self.k is None else self.k.size(2)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the new positions' keys and values (N, nh, T, hd); all of them, old and new."""
        if self.k is not None:
            k = torch.cat([self.k, k], dim=2)  # (N, nh, t + T, hd)
            v = torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v

    def select(self, rows: torch.Tensor) -> KVCache:
        """A cache of these rows (N',), in this order: beam search's reordering, finished
        inputs leaving, a row per candidate of its input."""
        if self.k is None:
            return KVCache()
        return KVCache(self.k.index_select(0, rows), self.v.index_select(0, rows))


class MultiHeadAttention(nn.Module):
    """Self-attention (fused QKV projection) or cross-attention (Q from x, fused KV from memory)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, cross: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.cross = cross
        self.dropout = dropout
        if cross:
            self.q_proj = nn.Linear(d_model, d_model)
            self.kv_proj = nn.Linear(d_model, 2 * d_model)
        else:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)

    def project_memory(self, memory: torch.Tensor, keys: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the encoder output; computed once per input for decoding.
        ``keys`` (B, S, d), when given, is what the keys are projected from instead (the
        values still come from ``memory``)."""
        if keys is None:
            k, v = self.kv_proj(memory).chunk(2, dim=-1)
        else:
            w_k, w_v = self.kv_proj.weight.chunk(2, dim=0)
            b_k, b_v = self.kv_proj.bias.chunk(2, dim=0)
            k, v = F.linear(keys, w_k, b_k), F.linear(memory, w_v, b_v)
        return self._heads(k), self._heads(v)  # (B, nh, S, hd) each

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None, need_weights: bool = False,
                rotary: Rotary | None = None, memory_keys: torch.Tensor | None = None):
        """x: (B, T, d). attn_mask: bool, broadcastable to (B, nh, T, S), True = may attend.

        ``cache`` (decoding): for self-attention, this step's keys/values are appended to those
        of the earlier steps; for cross-attention it holds the projected memory (projected and
        stored on the first call if empty).
        ``rotary`` (self-attention only): rotate q and k by their positions, which continue
        after the cached steps. ``memory_keys`` (cross-attention): project the keys from it
        instead of ``memory`` (``project_memory``).
        Returns (output (B, T, d), weights (B, nh, T, S) or None).
        """
        B, T, d = x.shape
        if self.cross and rotary is not None:
            raise ValueError("rotary positions apply to self-attention only; memory positions "
                             "are not comparable with query positions")
        if self.cross:
            q = self._heads(self.q_proj(x))
            if cache is not None and cache.k is not None:
                k, v = cache.k, cache.v
            else:
                k, v = self.project_memory(memory, memory_keys)
                if cache is not None:
                    cache.k, cache.v = k, v
        else:
            q, k, v = (self._heads(t) for t in self.qkv_proj(x).chunk(3, dim=-1))
            if rotary is not None:
                # cached keys were rotated when they were new, so only x's positions are rotated
                offset = cache.length if cache is not None else 0
                q, k = rotary.rotate(q, offset), rotary.rotate(k, offset)  # (B, nh, T, hd)
            if cache is not None:
                k, v = cache.append(k, v)  # (B, nh, t_past + T, hd)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            out, weights = _attention_with_weights(q, k, v, attn_mask, is_causal)
        elif q.device.type == "cpu" and dropout == 0.0 and (
                cache is not None or k.size(2) <= EXPLICIT_MAX_KEYS):
            # Incremental decoding on CPU (a handful of queries: 1.5-3x faster than SDPA's CPU
            # kernels, benchmarks/decode_speed.py) and short sequences in training or a full
            # forward (see EXPLICIT_MAX_KEYS); the same math.
            out, weights = _attention_with_weights(q, k, v, attn_mask, is_causal)[0], None
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout,
                                                 is_causal=is_causal)
            weights = None
        out = out.transpose(1, 2).reshape(B, T, d)  # (B, T, nh * hd)
        return self.out_proj(out), weights


def _attention_with_weights(q, k, v, attn_mask, is_causal):
    """The same attention computed explicitly, for when the probabilities are wanted (maps)."""
    scores = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)  # (B, nh, T, S)
    if is_causal:
        T, S = scores.shape[-2:]
        causal = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights
