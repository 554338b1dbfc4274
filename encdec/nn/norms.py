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
    """BatchNorm over the feature axis with statistics over the non-padded positions.

    In training the statistics are masked sums, so no step waits on the device to count the
    real positions (selecting them with the mask would: a sync per norm layer, which costs a
    shared GPU most of its throughput). Padded positions come out as zeros."""

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        if pad_mask is None or not self.training:  # running statistics: positions independent
            return super().forward(x.reshape(-1, x.size(-1))).view_as(x)
        keep = pad_mask.unsqueeze(-1).to(torch.float32)  # (B, T, 1)
        xf = x.float()
        count = keep.sum()
        mean = (xf * keep).sum((0, 1)) / count
        var = (((xf - mean) * keep) ** 2).sum((0, 1)) / count  # biased, to normalize with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = self.momentum
                if factor is None:  # cumulative moving average
                    factor = 1.0 / self.num_batches_tracked
                unbiased = var * count / (count - 1).clamp(min=1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        out = (xf - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return (out * keep).to(x.dtype)


NORMS = {"layernorm": LayerNorm, "rmsnorm": RMSNorm, "batchnorm": MaskedBatchNorm}


def make_norm(kind: str, d_model: int) -> nn.Module:
    return NORMS[kind](d_model)
