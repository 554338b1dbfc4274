"""Rotary position embedding (RoPE, Su et al., 2021) for queries and keys.

Each pair of channels (i, i + hd/2) of a head is rotated by the angle pos * base^(-2i/hd)
("rotate-half" layout, as in GPT-NeoX and LLaMA). A query at position m and a key at position n
then meet in a dot product that depends on m - n only, so attention sees relative positions and
the encoder needs no position vectors added to its input.
"""

from __future__ import annotations

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Rotary(nn.Module):
    """Rotates (B, nh, T, hd) queries or keys by their positions offset .. offset+T-1.

    One instance can be shared by every layer: it holds no weights, only ``inv_freq`` and a
    cos/sin table that grows on demand.
    """

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head dimension, got {head_dim} "
                             "(d_model / n_heads)")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # (hd/2,)
        # Plain attributes, not buffers: a cache, rebuilt when too short or on another device.
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def cos_sin(self, length: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the angles for positions offset .. offset+length-1, each (T, hd)."""
        end = offset + length
        if self._cos is None or self._cos.size(0) < end or self._cos.device != self.inv_freq.device:
            # double on growth so a run of ever-longer batches rebuilds only log(T) times
            size = max(end, 2 * self._cos.size(0)) if self._cos is not None else end
            pos = torch.arange(size, dtype=torch.float32, device=self.inv_freq.device)
            # float32 even after model.half(): angles of late positions need the precision
            angles = torch.outer(pos, self.inv_freq.float())  # (T, hd/2)
            angles = torch.cat([angles, angles], dim=-1)  # (T, hd): channel i and i+hd/2 share one
            self._cos, self._sin = angles.cos(), angles.sin()
        return self._cos[offset:end], self._sin[offset:end]

    # Named ``rotate`` rather than ``apply``: ``nn.Module.apply(fn)`` is called recursively on
    # children (``model.apply(init_fn)``), and overriding it would break that for any model
    # holding a Rotary.
    def rotate(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x: (B, nh, T, hd) -> same shape, position t rotated by angle (offset + t) * inv_freq."""
        cos, sin = self.cos_sin(x.size(-2), offset)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (T, hd), broadcast over B and nh
        return x * cos + rotate_half(x) * sin
