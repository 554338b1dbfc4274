"""Normalization layers for Transformer blocks: LayerNorm (default), RMSNorm, BatchNorm.

All take ``(x (B, T, d), pad_mask (B, T) or None)``, True at real positions. Only BatchNorm
uses the mask: its batch statistics are taken over real positions only, so the amount of
padding in a batch never changes a real position's output.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class RMSNorm(nn.RMSNorm):
    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


class MaskedBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the feature axis with statistics over the non-padded positions."""

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        if pad_mask is None or not self.training:  # running statistics: positions independent
            return super().forward(x.reshape(-1, x.size(-1))).view_as(x)
        out = torch.zeros_like(x)
        out[pad_mask] = super().forward(x[pad_mask])  # (N_real, d)
        return out


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm, "batchnorm": MaskedBatchNorm}


def make_norm(kind: str, d_model: int) -> nn.Module:
    return NORMS[kind](d_model)
