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
    """BatchNorm over the feature axis with statistics over the non-padded positions; padded
    positions come out as zeros.

    Two ways to the same numbers: on a CPU, PyTorch's BatchNorm over the real positions picked
    out with the mask (the fastest there); on a GPU, masked sums, since picking positions out
    makes the host wait for the device to count them, a sync per norm layer that costs a busy
    GPU most of its throughput. ``sync_free`` forces one way (None: by the tensor's device)."""

    sync_free: bool | None = None

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        if pad_mask is None or not self.training:  # running statistics: positions independent
            return super().forward(x.reshape(-1, x.size(-1))).view_as(x)
        sync_free = self.sync_free if self.sync_free is not None else x.device.type != "cpu"
        if not sync_free:
            out = torch.zeros_like(x)
            out[pad_mask] = super().forward(x[pad_mask])  # (N_real, d)
            return out
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
