"""SpecAugment (Park et al., 2019): frequency and time masks on log-mel features in training.

Time warping is left out (its gain is small and it costs most of the time). Masked values are
set to zero, which after mean/variance normalization is the mean.
"""

from __future__ import annotations

import torch


def _spans(widest: torch.Tensor, extent: torch.Tensor, generator) -> tuple[torch.Tensor, ...]:
    """Per row (B,): a width ~ U{0..widest} and a start so that the span fits in ``extent``."""
    u = torch.rand(2, extent.numel(), generator=generator).to(extent.device)
    width = torch.minimum((u[0] * (widest + 1).float()).long(), extent)
    start = (u[1] * (extent - width + 1).float()).long()
    return start[:, None], (start + width)[:, None]  # (B, 1) each: [start, end)


class SpecAugment(torch.nn.Module):
    """(B, T, F) features with (B,) frame counts -> the same, masked (in training mode only).

    ``freq_masks`` bands of up to ``freq_width`` bins; ``time_masks`` spans of up to
    ``time_width`` frames and at most ``time_ratio`` of each utterance's own length, so short
    utterances are not wiped out (the adaptive masks of Park et al., 2020). Masks stay inside
    each utterance's real frames."""

    def __init__(self, freq_masks: int = 2, freq_width: int = 27, time_masks: int = 2,
                 time_width: int = 40, time_ratio: float = 0.05):
        super().__init__()
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width, self.time_ratio = time_masks, time_width, time_ratio

    def forward(self, feats: torch.Tensor, lengths: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.training:
            return feats
        B, T, F = feats.shape
        lengths = lengths.to(feats.device).long()
        freq = torch.arange(F, device=feats.device)[None, :]  # (1, F)
        time = torch.arange(T, device=feats.device)[None, :]  # (1, T)
        masked_bins = torch.zeros(B, F, dtype=torch.bool, device=feats.device)
        masked_frames = torch.zeros(B, T, dtype=torch.bool, device=feats.device)
        all_bins = torch.full_like(lengths, F)
        for _ in range(self.freq_masks):
            start, end = _spans(torch.full_like(lengths, self.freq_width), all_bins, generator)
            masked_bins |= (freq >= start) & (freq < end)
        widest = torch.minimum(torch.full_like(lengths, self.time_width),
                               (lengths.float() * self.time_ratio).long())
        for _ in range(self.time_masks):
            start, end = _spans(widest, lengths, generator)
            masked_frames |= (time >= start) & (time < end)
        masked = masked_bins[:, None, :] | masked_frames[:, :, None]  # (B, T, F)
        return feats.masked_fill(masked, 0.0)
