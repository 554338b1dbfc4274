"""Reading audio: any format libsndfile reads (WAV, FLAC, OGG, ...), mixed to mono, resampled
to the model's rate with soxr, checked for what would silently spoil features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from encdec.data.corpus import DataError


class AudioError(DataError):
    """Audio that cannot be used; the message names the file and says why."""


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Mono float32 samples at ``to_rate`` (soxr's high-quality band-limited resampler)."""
    if from_rate == to_rate:
        return samples
    import soxr

    return soxr.resample(samples, from_rate, to_rate, quality="HQ").astype(np.float32)


def read_audio(path: str | Path, sample_rate: int = 16000) -> torch.Tensor:
    """The samples of ``path`` as a (N,) float32 tensor in [-1, 1] at ``sample_rate``.

    Several channels are averaged to one. Raises AudioError for a file that is missing, not
    audio, empty, or holds NaN or infinite samples.
    """
    import soundfile

    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: no such file")
    try:
        data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)  # (N, channels)
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"{path}: not an audio file libsndfile can read ({err})") from None
    return check_samples(data.mean(axis=1), rate, sample_rate, str(path))


def check_samples(samples: np.ndarray, rate: int, sample_rate: int, name: str) -> torch.Tensor:
    """Validate mono samples (from a file or an array a user passed) and resample them."""
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise AudioError(f"{name}: expected mono samples (one dimension), got shape "
                         f"{samples.shape}")
    if samples.size == 0:
        raise AudioError(f"{name}: the audio is empty (0 samples)")
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise AudioError(f"{name}: {bad} samples are NaN or infinite")
    if rate <= 0:
        raise AudioError(f"{name}: invalid sample rate {rate}")
    return torch.from_numpy(np.ascontiguousarray(resample(samples, int(rate), sample_rate)))
