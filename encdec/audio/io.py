"""Reading audio: any format libsndfile reads (WAV, FLAC, OGG, MP3, ...), from a path or from the
bytes of an upload, mixed to mono, resampled to the model's rate with soxr, and checked for what
would silently spoil features. Long audio is split into segments the recognizer decodes one by one.

Every problem with the audio itself is an AudioError whose message starts with the file (or
upload) name and says what would work. Behaviours that are not errors:

- any sample rate is resampled (8 kHz telephone audio, 44.1 and 48 kHz recordings alike);
- several channels are averaged to one;
- clipped audio (more than 1 % of samples at full scale) is used, and the reader's ``warn``
  callback, if given, is told once per file;
- a file cut short (a WAV whose header promises more than the file holds) gives the frames that
  are there, as libsndfile reads them;
- long audio is not refused: ``split_long`` cuts it at quiet moments into segments of at most
  15 s, and the recognizer joins the segments' texts with spaces.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from encdec.data.corpus import DataError

READABLE = "an audio file libsndfile can read (WAV, FLAC, OGG/Vorbis/Opus, MP3, AIFF, ...)"
CLIP_LEVEL = 0.999  # |x| at or above this is full scale: 16-bit PCM's top 32 codes
CLIP_WARN_FRACTION = 0.01  # speech peaks touch full scale now and then; 1 % is clearly clipped
CUT_WINDOW_SECONDS = 0.1  # split_long cuts in the quietest 100 ms: a pause between words
CUT_HOP_SECONDS = 0.01  # ... placed on a 10 ms grid, the feature frame hop

Warn = Callable[[str], None]


class AudioError(DataError):
    """Audio that cannot be used; the message names the file and says why."""


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Mono float32 samples at ``to_rate`` (soxr's high-quality band-limited resampler)."""
    if from_rate == to_rate:
        return samples
    import soxr

    return soxr.resample(samples, from_rate, to_rate, quality="HQ").astype(np.float32)


def read_audio(path: str | Path, sample_rate: int = 16000, *, min_seconds: float = 0.025,
               warn: Warn | None = None) -> torch.Tensor:
    """The samples of ``path`` as a (N,) float32 tensor in [-1, 1] at ``sample_rate``.

    Several channels are averaged to one. Raises AudioError for a file that is missing, empty,
    not audio, holds no samples, NaN or infinite samples, or less than ``min_seconds`` of audio.
    Clipped audio is returned; ``warn`` (if given) is called once with a message naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory; expected {READABLE}")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: the file is empty (0 bytes); expected {READABLE}")
    return _decode(str(path), str(path), sample_rate, min_seconds, warn)


def read_audio_bytes(data: bytes, name: str, sample_rate: int = 16000, *,
                     min_seconds: float = 0.025, warn: Warn | None = None) -> torch.Tensor:
    """``read_audio`` for the bytes of an upload, decoded in memory (no temporary file).

    ``name`` (the upload's file name or field) starts every error and warning message; the
    format is recognized from the bytes, not from the name.
    """
    if len(data) == 0:
        raise AudioError(f"{name}: the upload is empty (0 bytes); expected {READABLE}")
    return _decode(io.BytesIO(data), name, sample_rate, min_seconds, warn)


def _decode(source, name: str, sample_rate: int, min_seconds: float,
            warn: Warn | None) -> torch.Tensor:
    import soundfile

    try:
        data, rate = soundfile.read(source, dtype="float32", always_2d=True)  # (N, channels)
    except (soundfile.SoundFileError, RuntimeError, TypeError) as err:
        # libsndfile's own words ("Format not recognised.") without its copy of the path
        why = getattr(err, "error_string", None) or str(err)
        raise AudioError(f"{name}: not {READABLE} ({why})") from None
    # Check all channels before mixing: NaN or clipping in one channel is still a problem.
    _check(data, rate, name, min_seconds, warn)
    return torch.from_numpy(np.ascontiguousarray(resample(data.mean(axis=1), rate, sample_rate)))


def check_samples(samples: np.ndarray, rate: int, sample_rate: int, name: str, *,
                  min_seconds: float = 0.025, warn: Warn | None = None) -> torch.Tensor:
    """Validate mono float samples in [-1, 1] (from a file or an array a user passed) and
    resample them; the same checks, errors and clipping warning as ``read_audio``."""
    if np.issubdtype(np.asarray(samples).dtype, np.integer):
        raise AudioError(f"{name}: integer samples; pass floats in [-1, 1] (for 16-bit PCM, "
                         f"samples / 32768)")
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise AudioError(f"{name}: expected mono samples (one dimension), got shape "
                         f"{samples.shape}; average the channels first")
    _check(samples, rate, name, min_seconds, warn)
    return torch.from_numpy(np.ascontiguousarray(resample(samples, int(rate), sample_rate)))


def _check(samples: np.ndarray, rate: int, name: str, min_seconds: float,
           warn: Warn | None) -> None:
    """The checks shared by files, uploads and arrays; ``samples`` is (N,) or (N, channels)."""
    if rate <= 0:
        raise AudioError(f"{name}: invalid sample rate {rate}; expected a positive rate in Hz")
    frames = samples.shape[0]
    if frames == 0:
        raise AudioError(f"{name}: the audio is empty (0 samples); expected at least "
                         f"{min_seconds * 1000:g} ms of sound")
    finite = np.isfinite(samples)
    if not finite.all():
        bad = int(samples.size - finite.sum())
        raise AudioError(f"{name}: {bad} samples are NaN or infinite; every sample must be a "
                         f"finite number in [-1, 1]")
    # Shorter than one 25 ms analysis window gives no feature frame at all.
    if frames < min_seconds * rate:
        raise AudioError(f"{name}: too short: {frames / rate * 1000:.1f} ms; at least "
                         f"{min_seconds * 1000:g} ms")
    clipped = clipping_fraction(samples)
    if warn is not None and clipped > CLIP_WARN_FRACTION:
        warn(f"{name}: {clipped:.1%} of samples are clipped; recognition may suffer "
             f"(record at a lower level)")


def clipping_fraction(samples: np.ndarray | torch.Tensor) -> float:
    """The fraction of samples at full scale (|x| >= 0.999), any shape; 0.0 for no samples."""
    samples = np.asarray(samples)
    return float((np.abs(samples) >= CLIP_LEVEL).mean()) if samples.size else 0.0


def split_long(samples: torch.Tensor, sample_rate: int, max_seconds: float = 15.0,
               min_seconds: float = 5.0) -> list[tuple[int, int]]:
    """(start, end) sample ranges that tile ``[0, len(samples))``, each at most ``max_seconds``.

    Audio no longer than ``max_seconds`` is one segment. Longer audio is cut, segment by segment,
    in the middle of the quietest 100 ms window (lowest energy, so lowest RMS) lying between
    ``min_seconds`` and ``max_seconds`` after the segment's start: a pause between words when
    there is one. Every segment but the last is at least ``min_seconds``; the last is at least
    50 ms. Cuts fall on a 10 ms grid.
    """
    samples = torch.as_tensor(samples)
    if samples.dim() != 1:
        raise ValueError(f"split_long: expected mono samples (one dimension), got shape "
                         f"{tuple(samples.shape)}")
    total = samples.numel()
    hop = max(1, round(CUT_HOP_SECONDS * sample_rate))
    window = round(CUT_WINDOW_SECONDS / CUT_HOP_SECONDS)  # in hops
    longest = round(max_seconds * sample_rate)  # in samples
    # Cut windows may start first .. last - window hops after a segment's start
    first, last = -(-round(min_seconds * sample_rate) // hop), longest // hop
    if first < 0 or last - window < first:
        raise ValueError(f"split_long: need 0 <= min_seconds and max_seconds - min_seconds >= "
                         f"{CUT_WINDOW_SECONDS} s, got min_seconds={min_seconds}, "
                         f"max_seconds={max_seconds} at {sample_rate} Hz")
    if total <= longest:
        return [(0, total)]
    # Energy per 10 ms hop, then of every 100 ms window by a running sum: (hops,) -> (hops - 9,)
    hops = total // hop
    energy = samples[: hops * hop].float().reshape(hops, hop).pow(2).sum(1).double()
    running = torch.cat([energy.new_zeros(1), energy.cumsum(0)])
    window_energy = running[window:] - running[:-window]  # window k covers hops k .. k+9
    segments, start = [], 0  # start is in hops: every cut lies on the grid
    while total - start * hop > longest:
        # Windows lying in [start + min_seconds, start + max_seconds); the loop condition keeps
        # them inside the audio.
        k = start + first + int(window_energy[start + first: start + last - window + 1].argmin())
        cut = k + window // 2
        segments.append((start * hop, cut * hop))
        start = cut
    segments.append((start * hop, total))
    return segments
