"""Log-mel features back to audio: the built-in vocoder (fast Griffin-Lim in PyTorch).

The features are those of ``encdec.audio.features.LogMel`` (Kaldi-style power log-mel of
25 ms Povey-windowed frames every 10 ms, pre-emphasis 0.97, samples in 16-bit range). To
invert them:

1. mel -> linear power spectrum: non-negative least squares through the mel filters
   (multiplicative updates, which keep every bin >= 0; the filters' pseudo-inverse would make
   bins negative), then the magnitude is its square root;
2. pre-emphasis undone in the frequency domain: each bin divided by |1 - 0.97 e^{-iw}|;
3. phase by fast Griffin-Lim (Perraudin, Balazs & Sondergaard 2013: Griffin-Lim with a
   momentum term, 0.99 by default), 32 iterations by default, over PyTorch's own ``stft`` /
   ``istft`` with a Hann window of the frame length and the frame shift as hop;
4. scaled from 16-bit range back to [-1, 1].

Dimensions: B batch, T frames, F mel bins, K linear bins (fft_size // 2 + 1), N samples.
"""

from __future__ import annotations

import math

import torch

from encdec.audio.features import FbankOptions, mel_filterbank


def mel_to_magnitude(log_mel: torch.Tensor, opts: FbankOptions = FbankOptions(),
                     iterations: int = 64) -> torch.Tensor:
    """(B, T, F) log-mel power -> (B, T, K) linear magnitude, pre-emphasis undone."""
    filters = mel_filterbank(opts).to(log_mel.device)  # (F, K - 1): Kaldi leaves out Nyquist
    mel = log_mel.float().exp()
    # Non-negative least squares, min |x M^T - mel|^2 with x >= 0, by multiplicative updates
    # (Lee & Seung), started from the transposed projection.
    x = (mel @ filters).clamp(min=1e-10)
    target = mel @ filters
    for _ in range(iterations):
        x = x * target / ((x @ filters.T) @ filters).clamp(min=1e-10)
    power = torch.cat([x, x[..., -1:]], dim=-1)  # the Nyquist bin: its neighbour's value
    k = torch.arange(power.size(-1), device=power.device, dtype=torch.float32)
    w = math.pi * k / (power.size(-1) - 1)
    emphasis = (1 - 2 * opts.preemphasis * torch.cos(w) + opts.preemphasis ** 2).sqrt()
    return power.sqrt() / emphasis.clamp(min=1e-3)


def _frames_stft(wave: torch.Tensor, opts: FbankOptions, window: torch.Tensor) -> torch.Tensor:
    """(B, N) -> (B, K, T): the front end's framing (frame t = samples [t * hop, t * hop +
    frame_length), whole frames only), windowed, FFT of ``fft_size``."""
    frames = wave.unfold(1, opts.frame_length, opts.frame_shift) * window
    return torch.fft.rfft(frames, n=opts.fft_size).transpose(1, 2)


def _frames_istft(spec: torch.Tensor, opts: FbankOptions, window: torch.Tensor) -> torch.Tensor:
    """(B, K, T) -> (B, N): the least-squares inverse of ``_frames_stft`` (windowed overlap-add
    divided by the summed squared window)."""
    win, hop = opts.frame_length, opts.frame_shift
    T = spec.size(-1)
    n = (T - 1) * hop + win
    frames = torch.fft.irfft(spec.transpose(1, 2), n=opts.fft_size)[..., :win] * window
    ola = torch.nn.functional.fold(frames.transpose(1, 2), (1, n), (1, win), stride=(1, hop))
    norm = torch.nn.functional.fold(window.square()[None, :, None].expand(1, win, T), (1, n),
                                    (1, win), stride=(1, hop))
    return (ola / norm.clamp(min=1e-3)).reshape(spec.size(0), n)


def griffin_lim(magnitude: torch.Tensor, opts: FbankOptions = FbankOptions(),
                iterations: int = 32, momentum: float = 0.99, seed: int = 0,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, K) magnitudes -> (B, N) waveforms (16-bit range), N = (T - 1) * hop + frame.

    ``momentum`` 0 is the original Griffin-Lim. The starting phase is random with ``seed``,
    so the same input gives the same audio."""
    window = torch.hann_window(opts.frame_length, periodic=False, device=magnitude.device)
    spec_mag = magnitude.float().transpose(1, 2)  # (B, K, T)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    phase = torch.rand(spec_mag.shape, generator=gen).to(magnitude.device) * 2 * math.pi
    angles = torch.polar(torch.ones_like(spec_mag), phase)
    previous = torch.zeros_like(angles)
    for _ in range(iterations):
        rebuilt = _frames_stft(_frames_istft(spec_mag * angles, opts, window), opts, window)
        angles = rebuilt - (momentum / (1 + momentum)) * previous if momentum else rebuilt
        previous = rebuilt
        angles = angles / angles.abs().clamp(min=1e-8)
    wave = _frames_istft(spec_mag * angles, opts, window)
    if lengths is not None:  # frames past a row's end are padding: silence them
        ends = (lengths.to(wave.device) - 1).clamp(min=0) * opts.frame_shift + opts.frame_length
        keep = torch.arange(wave.size(1), device=wave.device)[None, :] < ends[:, None]
        wave = wave.masked_fill(~keep, 0.0)
    return wave


def vocode(log_mel: torch.Tensor, opts: FbankOptions = FbankOptions(), iterations: int = 32,
           momentum: float = 0.99, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, F) log-mel features -> (B, N) waveforms in [-1, 1]."""
    wave = griffin_lim(mel_to_magnitude(log_mel, opts), opts, iterations, momentum,
                       lengths=lengths)
    return (wave / 32768.0).clamp(-1.0, 1.0)


def spectral_convergence(magnitude: torch.Tensor, wave: torch.Tensor,
                         opts: FbankOptions = FbankOptions()) -> float:
    """|| |STFT(wave)| - magnitude ||_F / || magnitude ||_F: how consistent the phase found is
    with the magnitudes asked for (0 = a signal with exactly these magnitudes)."""
    window = torch.hann_window(opts.frame_length, periodic=False, device=wave.device)
    got = _frames_stft(wave, opts, window).abs()
    want = magnitude.transpose(1, 2)
    t = min(got.size(-1), want.size(-1))
    return float((got[..., :t] - want[..., :t]).norm() / want[..., :t].norm())
