"""Convolutional subsampling of feature frames before the encoder (the speech front).

Log-mel frames come every 10 ms; an encoder attending over them would spend most of its time
on attention over 100 positions per second. Strided 2-D convolutions over (time, frequency)
cut the frame rate by 4 (40 ms per position), 6 or 8 and project to d_model, as in ESPnet's
Conv2dSubsampling and fairseq S2T's front ends.

Dimensions: B batch, T frames, F feature bins, C channels, T' subsampled positions, d model width.
"""

from __future__ import annotations

import torch
from torch import nn

# factor -> (kernel, stride) of each convolution; no padding, so an output position only sees
# frames inside the utterance (see ``output_lengths``)
LAYOUTS = {4: [(3, 2), (3, 2)], 6: [(3, 2), (5, 3)], 8: [(3, 2), (3, 2), (3, 2)]}


def conv_output_length(lengths: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    return (lengths - kernel).div(stride, rounding_mode="floor") + 1


class Conv2dSubsampling(nn.Module):
    """(B, T, F) frames and (B,) lengths -> (B, T', d) vectors and (B,) lengths."""

    def __init__(self, num_bins: int, d_model: int, factor: int = 4, channels: int | None = None):
        super().__init__()
        if factor not in LAYOUTS:
            raise ValueError(f"subsampling factor {factor}: choose one of {sorted(LAYOUTS)}")
        channels = channels or d_model
        self.layout = LAYOUTS[factor]
        convs, in_ch, bins = [], 1, num_bins
        for kernel, stride in self.layout:
            convs += [nn.Conv2d(in_ch, channels, kernel, stride), nn.ReLU()]
            in_ch, bins = channels, (bins - kernel) // stride + 1
        if bins < 1:
            raise ValueError(f"{num_bins} feature bins are too few for subsampling by {factor}")
        self.convs = nn.Sequential(*convs)
        self.out = nn.Linear(channels * bins, d_model)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for kernel, stride in self.layout:
            lengths = conv_output_length(lengths, kernel, stride)
        return lengths.clamp(min=0)

    def min_frames(self) -> int:
        """The fewest input frames that give one output position."""
        n = 1
        for kernel, stride in reversed(self.layout):
            n = (n - 1) * stride + kernel
        return n

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor):
        if feats.size(1) < self.min_frames():
            raise ValueError(f"{feats.size(1)} frames are fewer than the {self.min_frames()} that "
                             "subsampling needs for one position")
        h = self.convs(feats[:, None])  # (B, C, T', F')
        B, C, T, F = h.shape
        h = self.out(h.transpose(1, 2).reshape(B, T, C * F))  # (B, T', d)
        return h, self.output_lengths(lengths)
