"""Bad audio, through real files and through the bytes of an upload: each case is an AudioError
that names the file and says what would work, or a documented behaviour (resampling, mixing to
mono, a clipping warning, segmenting long audio) — never a traceback."""

from itertools import pairwise

import numpy as np
import pytest
import soundfile
import torch

from encdec.audio import AudioError, check_samples, clipping_fraction, read_audio
from encdec.audio import read_audio_bytes, split_long

SR = 16000


def _tone(seconds: float, rate: int, hz: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * hz * t)).astype(np.float32)


@pytest.fixture(params=["file", "upload"])
def reader(request):
    """(read, name): read a file by path, or its bytes as an upload called after it; ``name``
    is what the messages about that file must start with."""
    if request.param == "file":
        return (lambda path, **kw: read_audio(path, **kw)), str
    return (lambda path, **kw: read_audio_bytes(path.read_bytes(), f"upload {path.name}", **kw),
            lambda path: f"upload {path.name}")


def _refused(reader, path, message):
    read, name = reader
    with pytest.raises(AudioError, match=message) as err:
        read(path)
    assert str(err.value).startswith(f"{name(path)}: "), str(err.value)
    return str(err.value)


def test_not_audio_is_refused(reader, tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is a text file renamed to .wav\n")
    message = _refused(reader, path, "not an audio file libsndfile can read")
    assert "WAV, FLAC" in message and "Format not recognised" in message


def test_empty_file_is_refused(reader, tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    _refused(reader, path, r"empty \(0 bytes\); expected an audio file")


def test_wav_with_zero_frames_is_refused(reader, tmp_path):
    path = tmp_path / "zero.wav"
    soundfile.write(path, np.zeros(0, dtype=np.float32), SR, subtype="PCM_16")
    assert path.stat().st_size > 0  # a valid header, no samples
    _refused(reader, path, r"the audio is empty \(0 samples\)")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_infinite_samples_are_refused(reader, tmp_path, bad):
    path = tmp_path / "nan.wav"
    samples = _tone(0.1, SR)
    samples[[7, 700]] = bad
    soundfile.write(path, samples, SR, subtype="FLOAT")
    _refused(reader, path, "2 samples are NaN or infinite; every sample must be a finite number")


def test_shorter_than_one_frame_is_refused(reader, tmp_path):
    read, _ = reader
    soundfile.write(tmp_path / "short.wav", _tone(399 / SR, SR), SR, subtype="PCM_16")
    soundfile.write(tmp_path / "frame.wav", _tone(400 / SR, SR), SR, subtype="PCM_16")
    _refused(reader, tmp_path / "short.wav", "too short: 24.9 ms; at least 25 ms")
    assert read(tmp_path / "frame.wav").shape == (400,)  # one 25 ms frame is enough


@pytest.mark.parametrize("rate", [8000, 44100, 48000])
def test_other_rates_are_resampled_keeping_the_pitch(reader, tmp_path, rate):
    read, _ = reader
    path = tmp_path / f"tone{rate}.wav"
    soundfile.write(path, _tone(1.5, rate), rate, subtype="PCM_16")
    samples = read(path)
    assert samples.dtype == torch.float32 and samples.shape == (24000,)  # 1.5 s at 16 kHz
    spectrum = np.abs(np.fft.rfft(samples.numpy()))
    assert spectrum.argmax() == 660  # 2/3 Hz per bin: still 440 Hz


def test_stereo_is_mixed_to_the_mean_of_its_channels(reader, tmp_path):
    read, _ = reader
    left, right = _tone(0.5, SR), np.random.default_rng(0).uniform(-0.3, 0.3, SR // 2)
    soundfile.write(tmp_path / "stereo.wav", np.stack([left, right], 1), SR, subtype="FLOAT")
    expected = torch.from_numpy((left + right.astype(np.float32)) / 2)
    torch.testing.assert_close(read(tmp_path / "stereo.wav"), expected, rtol=0, atol=1e-6)


def test_clipped_audio_is_used_with_one_warning(reader, tmp_path):
    read, name = reader
    soundfile.write(tmp_path / "loud.wav", np.clip(_tone(0.5, SR, amplitude=2.0), -1, 1), SR,
                    subtype="PCM_16")
    soundfile.write(tmp_path / "fine.wav", _tone(0.5, SR, amplitude=0.99), SR, subtype="PCM_16")
    warnings = []
    samples = read(tmp_path / "loud.wav", warn=warnings.append)
    assert samples.shape == (8000,) and float(samples.abs().max()) > 0.999
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{name(tmp_path / 'loud.wav')}: ")
    assert "% of samples are clipped; recognition may suffer" in warnings[0]
    read(tmp_path / "fine.wav", warn=warnings.append)  # peaks just below full scale
    assert len(warnings) == 1
    assert clipping_fraction(torch.tensor([0.0, 0.5, 1.0, -0.9995])) == 0.5


def test_ten_minutes_is_split_inside_silences(reader, tmp_path):
    """Tone bursts of 0.5 to 3 s between 300 ms silences: every cut lands in a silence."""
    read, _ = reader
    rng = np.random.default_rng(0)
    total = 600 * SR
    loud = np.zeros(total, dtype=bool)
    silences, pos = [], 0
    while pos < total:
        burst = int(rng.integers(SR // 2, 3 * SR))
        loud[pos: pos + burst] = True
        silences.append((pos + burst, pos + burst + int(0.3 * SR)))
        pos += burst + int(0.3 * SR)
    t = np.arange(total) / SR
    tone = 0.4 * np.sin(2 * np.pi * 300 * t) + 0.05 * rng.standard_normal(total)
    signal = np.where(loud, tone, 0)
    soundfile.write(tmp_path / "long.flac", signal, SR)
    samples = read(tmp_path / "long.flac")
    assert samples.shape == (total,)  # long audio is not refused

    segments = split_long(samples, SR, max_seconds=15.0, min_seconds=5.0)
    assert segments[0][0] == 0 and segments[-1][1] == total
    assert all(end == next_start for (_, end), (next_start, _) in pairwise(segments))
    assert all(5 * SR <= end - start <= 15 * SR for start, end in segments[:-1])
    assert 0 < segments[-1][1] - segments[-1][0] <= 15 * SR
    cuts = np.array([end for _, end in segments[:-1]])
    assert len(cuts) >= 600 // 15
    starts, ends = np.array(silences).T
    inside = (starts[None] <= cuts[:, None]) & (cuts[:, None] < ends[None])  # (cuts, silences)
    assert inside.any(1).all(), cuts[~inside.any(1)]


def test_split_long_keeps_short_audio_whole_and_checks_its_limits():
    assert split_long(torch.zeros(15 * SR), SR) == [(0, 15 * SR)]
    assert split_long(torch.zeros(5), SR) == [(0, 5)]
    segments = split_long(torch.zeros(15 * SR + 1), SR)
    assert len(segments) == 2 and segments[-1][1] == 15 * SR + 1
    with pytest.raises(ValueError, match="max_seconds - min_seconds >= 0.1 s"):
        split_long(torch.zeros(20 * SR), SR, max_seconds=5.05, min_seconds=5.0)


def test_arrays_from_the_python_api_get_the_same_checks():
    """check_samples is what the Python API calls with an array and its rate."""
    warnings = []
    out = check_samples(np.ones(1600, dtype=np.float32), 8000, SR, "array", warn=warnings.append)
    assert out.shape == (3200,) and len(warnings) == 1 and warnings[0].startswith("array: ")
    bad = {"integer samples; pass floats in": np.full(800, 1000, dtype=np.int16),
           "expected mono samples": np.zeros((800, 2), dtype=np.float32),
           "1 samples are NaN": np.array([0.0] * 799 + [np.nan], dtype=np.float32),
           "too short: 12.5 ms": np.zeros(200, dtype=np.float32)}
    for message, samples in bad.items():
        with pytest.raises(AudioError, match=f"^array: .*{message}"):
            check_samples(samples, SR, SR, "array")


def test_read_audio_mixes_to_mono_and_resamples(tmp_path):
    import soundfile

    t = np.arange(48000) / 48000  # one second of a 1 kHz tone at 48 kHz, in two channels
    tone = 0.5 * np.sin(2 * np.pi * 1000 * t)
    soundfile.write(tmp_path / "stereo.wav", np.stack([tone, tone * 0.5], 1), 48000, subtype="PCM_16")
    soundfile.write(tmp_path / "tone.flac", tone, 48000)
    for name, amplitude in (("stereo.wav", 0.375), ("tone.flac", 0.5)):
        x = read_audio(tmp_path / name)
        assert x.dtype == torch.float32 and x.shape == (16000,)
        spectrum = np.abs(np.fft.rfft(x.numpy()))
        assert spectrum.argmax() == 1000  # 1 Hz per bin: the tone is still at 1 kHz
        assert float(x[1000:-1000].abs().max()) == pytest.approx(amplitude, rel=0.01)


def test_bad_audio_is_a_clear_error(tmp_path):
    import soundfile

    (tmp_path / "notes.txt").write_text("this is not audio\n")
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), SR)
    soundfile.write(tmp_path / "nan.wav", np.array([0.1, np.nan, 0.2], dtype=np.float32), SR,
                    subtype="FLOAT")
    cases = {"missing.wav": "no such file", "notes.txt": "not an audio file",
             "empty.wav": "the audio is empty", "nan.wav": "1 samples are NaN or infinite"}
    for name, message in cases.items():
        with pytest.raises(AudioError, match=message) as err:
            read_audio(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name))
