"""Log-mel filterbank features in PyTorch, Kaldi-compatible (so they run on GPU too).

The computation follows Kaldi's ``compute-fbank-feats`` with its defaults (the ones
``kaldi-native-fbank`` also uses, our test reference): 25 ms frames every 10 ms with
``snip_edges`` (only whole frames), DC offset removed per frame, pre-emphasis 0.97, the Povey
window, an FFT of the next power of two, the power spectrum, triangular filters equally spaced
on the mel scale 1127 ln(1 + f / 700) from 20 Hz to the Nyquist frequency (the Nyquist FFT bin
itself excluded, as in Kaldi), and the natural log floored at float32 epsilon. Samples are
expected in 16-bit range (a [-1, 1] float waveform times 32768), as Kaldi reads WAV files.

Dimensions: B batch, N samples, T frames, F mel bins (``num_mel_bins``, 80 by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class FbankOptions:
    sample_rate: int = 16000
    num_mel_bins: int = 80
    frame_length_ms: float = 25.0
    frame_shift_ms: float = 10.0
    preemphasis: float = 0.97
    low_freq: float = 20.0
    high_freq: float = 0.0  # 0: the Nyquist frequency; negative: that far below it
    dither: float = 0.0  # Gaussian noise of this std added to the samples (training only)
    # Frequency warping (VTLN/VTLP, ``mel_filterbank(opts, warp)``): linear between these
    # cutoffs (vtln_high <= 0: that far below the Nyquist frequency), Kaldi's defaults.
    vtln_low: float = 100.0
    vtln_high: float = -500.0

    @property
    def frame_length(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    @property
    def frame_shift(self) -> int:
        return int(self.sample_rate * self.frame_shift_ms / 1000)

    @property
    def fft_size(self) -> int:
        return 1 << (self.frame_length - 1).bit_length()


def num_frames(num_samples: torch.Tensor | int, opts: FbankOptions) -> torch.Tensor | int:
    """Whole frames in ``num_samples`` samples (Kaldi's snip_edges): 0 below one frame."""
    if isinstance(num_samples, torch.Tensor):
        n = (num_samples - opts.frame_length).div(opts.frame_shift, rounding_mode="floor") + 1
        return n.clamp(min=0)
    if num_samples < opts.frame_length:
        return 0
    return 1 + (num_samples - opts.frame_length) // opts.frame_shift


def mel_scale(freq: torch.Tensor | float):
    if isinstance(freq, torch.Tensor):
        return 1127.0 * torch.log1p(freq / 700.0)
    return 1127.0 * math.log1p(freq / 700.0)


def inverse_mel_scale(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * torch.expm1(mel / 1127.0)


def warp_freq(freq: torch.Tensor, warp: float, low: float, high: float, vtln_low: float,
              vtln_high: float) -> torch.Tensor:
    """Frequencies (Hz) moved by the piecewise-linear VTLN warp of factor ``warp``: scaled by
    1 / warp between two inflection points (near ``vtln_low`` and ``vtln_high``), joined by
    straight lines to the fixed ends ``low`` and ``high``, so the band's edges stay put.
    The inflection points are chosen so that the scaled part never leaves [low, high]."""
    if warp == 1.0:
        return freq
    lo, hi = vtln_low * max(1.0, warp), vtln_high * min(1.0, warp)  # inflection points
    scale = 1.0 / warp
    below = low + (scale * lo - low) / (lo - low) * (freq - low)
    above = high + (scale * hi - high) / (hi - high) * (freq - high)
    out = torch.where(freq < lo, below, torch.where(freq < hi, scale * freq, above))
    return torch.where((freq < low) | (freq > high), freq, out)


def mel_filterbank(opts: FbankOptions, warp: float = 1.0) -> torch.Tensor:
    """(F, fft_size // 2) triangular filters over the FFT bins below Nyquist (Kaldi's MelBanks).
    ``warp`` != 1 moves each filter's edges by ``warp_freq`` (Kaldi's VTLN warp factor):
    training with random factors is vocal tract length perturbation (Jaitly & Hinton, 2013)."""
    nyquist = opts.sample_rate / 2
    high = opts.high_freq if opts.high_freq > 0 else nyquist + opts.high_freq
    if not 0 <= opts.low_freq < high <= nyquist:
        raise ValueError(f"mel filters need 0 <= low_freq < high_freq <= {nyquist} Hz "
                         f"(got {opts.low_freq}, {high})")
    n_fft_bins = opts.fft_size // 2
    freqs = torch.arange(n_fft_bins, dtype=torch.float64) * (opts.sample_rate / opts.fft_size)
    mel = mel_scale(freqs)[None, :]  # (1, n_fft_bins)
    mel_low, mel_high = mel_scale(float(opts.low_freq)), mel_scale(float(high))
    delta = (mel_high - mel_low) / (opts.num_mel_bins + 1)
    b = torch.arange(opts.num_mel_bins, dtype=torch.float64)[:, None]
    left, center, right = mel_low + b * delta, mel_low + (b + 1) * delta, mel_low + (b + 2) * delta
    if warp != 1.0:
        vtln_high = opts.vtln_high if opts.vtln_high > 0 else nyquist + opts.vtln_high
        if not opts.low_freq < opts.vtln_low < vtln_high < high:
            raise ValueError(f"frequency warping needs low_freq < vtln_low < vtln_high < "
                             f"high_freq (got {opts.low_freq}, {opts.vtln_low}, {vtln_high}, "
                             f"{high} Hz)")
        left, center, right = (mel_scale(warp_freq(inverse_mel_scale(m), warp, opts.low_freq,
                                                   high, opts.vtln_low, vtln_high))
                               for m in (left, center, right))
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    weights = torch.where(mel <= center, up, down)
    weights = torch.where((mel > left) & (mel < right), weights, torch.zeros_like(weights))
    return weights.float()


def povey_window(length: int) -> torch.Tensor:
    n = torch.arange(length, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(2 * math.pi * n / (length - 1))).pow(0.85).float()


class LogMel(torch.nn.Module):
    """Waveforms (B, N) and their lengths (B,) -> log-mel features (B, T, F) and frame counts."""

    def __init__(self, opts: FbankOptions = FbankOptions()):
        super().__init__()
        self.opts = opts
        self.register_buffer("window", povey_window(opts.frame_length), persistent=False)
        self.register_buffer("filters", mel_filterbank(opts), persistent=False)

    def forward(self, waves: torch.Tensor, lengths: torch.Tensor | None = None,
                warps: list[float] | None = None):
        """``warps``: a frequency-warp factor per row (``mel_filterbank``), or None for none."""
        o = self.opts
        waves = waves.float()
        if lengths is None:
            lengths = torch.full((waves.size(0),), waves.size(1), device=waves.device)
        frames_per_row = num_frames(lengths, o)  # (B,)
        if waves.size(1) < o.frame_length:  # too short for one frame: no features
            empty = waves.new_zeros(waves.size(0), 0, o.num_mel_bins)
            return empty, frames_per_row
        if self.training and o.dither > 0:
            waves = waves + o.dither * torch.randn_like(waves)
        frames = waves.unfold(1, o.frame_length, o.frame_shift)  # (B, T, frame_length)
        frames = frames - frames.mean(dim=-1, keepdim=True)  # DC offset
        # Pre-emphasis within each frame; the first sample uses itself as its predecessor.
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = (frames - o.preemphasis * previous) * self.window
        spectrum = torch.fft.rfft(frames, n=o.fft_size)  # (B, T, fft_size // 2 + 1)
        power = spectrum.real.square() + spectrum.imag.square()
        if warps is None or all(w == 1.0 for w in warps):
            mel = power[..., : o.fft_size // 2] @ self.filters.T  # (B, T, F)
        else:
            filters = torch.stack([mel_filterbank(o, float(w)) for w in warps]).to(power)
            mel = power[..., : o.fft_size // 2] @ filters.transpose(1, 2)  # (B, T, F)
        feats = mel.clamp(min=FLOAT_EPS).log()
        # Frames past a row's own end are padding: zero them (lengths say how many are real).
        real = torch.arange(feats.size(1), device=feats.device)[None, :] < frames_per_row[:, None]
        return feats.masked_fill(~real[..., None], 0.0), frames_per_row
