"""Dropout with a cheaper random mask on the CPU.

PyTorch's CPU dropout draws one Bernoulli sample per element (``aten::bernoulli_``) from the
single-threaded mt19937 generator, about 6 ms per million elements here: 9 % of a g2p-small
training step (``benchmarks/train_profile.py``). Here each 64-bit draw from the same generator
gives four 16-bit uniforms, so the mask costs about a quarter of that. The drop probability is
rounded to a multiple of 2^-16 (0.1 becomes 0.1000061) and kept values are scaled by the exact
1 / (1 - rounded p), so the expectation is unchanged. The generator is torch's default one:
``torch.manual_seed`` and the RNG state a checkpoint saves reproduce the masks (exact resume).
On other devices PyTorch's own fused dropout runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_LEVELS = 1 << 16


def dropout_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A tensor like ``x``: 0 where dropped, 1 / (1 - p) elsewhere (CPU, 0 < p < 1)."""
    dropped = round(p * _LEVELS)  # uniforms below this level (of 2^16) are dropped
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(1 << 63), None)
    uniform = words.view(torch.int16)[:n].view(x.shape)  # uniform over [-2^15, 2^15)
    keep = uniform >= dropped - _LEVELS // 2
    return keep.to(x.dtype).mul_(_LEVELS / (_LEVELS - dropped))


def _cheap(x: torch.Tensor, p: float) -> bool:
    return x.device.type == "cpu" and 0 < round(p * _LEVELS) < _LEVELS


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0:
        return x
    if _cheap(x, p):
        return x * dropout_mask(x, p)
    return F.dropout(x, p, training=True)


def residual_dropout(x: torch.Tensor, h: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """``x + dropout(h)``, in one pass over the tensors on the CPU."""
    if training and p > 0 and _cheap(h, p) and x.dtype == h.dtype:
        return torch.addcmul(x, h, dropout_mask(h, p))
    return x + dropout(h, p, training)


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
