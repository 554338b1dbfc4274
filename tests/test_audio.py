"""The speech front end: Kaldi-compatible log-mel features checked against kaldi-native-fbank,
audio reading and resampling with clear errors, normalization statistics, SpecAugment."""

import numpy as np
import pytest
import torch

from encdec.audio import AudioError, FbankOptions, FeatureStats, LogMel, SpecAugment, num_frames
from encdec.audio import read_audio
from encdec.audio.features import mel_filterbank

SR = 16000


def _signal(seconds: float, seed: int = 0) -> np.ndarray:
    """A chirp with harmonics and noise: energy across the whole mel range."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(SR * seconds)) / SR
    chirp = np.sin(2 * np.pi * (100 + 1800 * t) * t)
    return (0.3 * chirp + 0.1 * np.sign(chirp) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def _kaldi(samples: np.ndarray, bins: int = 80) -> np.ndarray:
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = bins
    fbank = knf.OnlineFbank(opts)
    fbank.accept_waveform(SR, (samples * 32768).tolist())
    fbank.input_finished()
    if not fbank.num_frames_ready:
        return np.zeros((0, bins), dtype=np.float32)
    return np.stack([fbank.get_frame(i) for i in range(fbank.num_frames_ready)])


@pytest.mark.parametrize("bins", [80, 40])
def test_log_mel_equals_kaldi_native_fbank(bins):
    """Same frames and values: log energies (about 5 to 25) within 0.01 everywhere (1 % of the
    energy: float32 rounding in quiet bands, where a band holds 1e-5 of a frame's energy) and
    within 1e-4 on average."""
    samples = _signal(2.37)
    ours, frames = LogMel(FbankOptions(num_mel_bins=bins))(torch.from_numpy(samples * 32768)[None])
    ref = _kaldi(samples, bins)
    assert ours.shape == (1, *ref.shape) and int(frames[0]) == ref.shape[0] == 235
    diff = np.abs(ours[0].numpy() - ref)
    assert diff.max() < 1e-2 and diff.mean() < 1e-4, (diff.max(), diff.mean())


def test_batched_features_equal_one_at_a_time_and_padding_is_zero():
    waves = [_signal(s, seed) for seed, s in enumerate((1.0, 0.43, 0.0249, 0.7))]
    batch = torch.zeros(len(waves), max(len(w) for w in waves))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = torch.from_numpy(w * 32768)
    lengths = torch.tensor([len(w) for w in waves])
    feats, frames = LogMel()(batch, lengths)
    assert frames.tolist() == [num_frames(len(w), FbankOptions()) for w in waves] == [98, 41, 0, 68]
    for i, w in enumerate(waves):
        n = int(frames[i])
        np.testing.assert_allclose(feats[i, :n].numpy(), _kaldi(w), atol=1e-2, rtol=0)
        assert feats[i, n:].abs().max() == 0 if n < feats.size(1) else True


@pytest.mark.parametrize("n", [0, 399, 400, 559, 560, 16000])
def test_frame_count_matches_kaldi(n):
    assert num_frames(n, FbankOptions()) == _kaldi(_signal(n / SR))[:, 0].size
    assert int(num_frames(torch.tensor([n]), FbankOptions())[0]) == num_frames(n, FbankOptions())


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


def test_feature_stats_normalize_to_zero_mean_unit_variance(tmp_path):
    torch.manual_seed(0)
    utterances = [torch.randn(n, 5) * torch.arange(1, 6) + 3 for n in (7, 30, 12)]
    stats = FeatureStats(5)
    for u in utterances:
        stats.add(u)
    frames = torch.cat(utterances)
    torch.testing.assert_close(stats.mean, frames.mean(0))
    torch.testing.assert_close(stats.std, frames.std(0, unbiased=False), rtol=1e-5, atol=1e-5)
    normalized = stats.normalize(frames)
    torch.testing.assert_close(normalized.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    stats.save(tmp_path / "stats.safetensors")
    again = FeatureStats.load(tmp_path / "stats.safetensors")
    assert again.count == 49
    torch.testing.assert_close(again.normalize(frames), normalized)


def test_specaugment_masks_within_limits_and_only_in_training():
    feats = torch.randn(3, 200, 80) + 10  # no value is 0 before masking
    lengths = torch.tensor([200, 120, 30])
    for i, n in enumerate(lengths.tolist()):
        feats[i, n:] = 0
    aug = SpecAugment(freq_masks=2, freq_width=10, time_masks=2, time_width=40, time_ratio=0.1)
    assert torch.equal(aug.eval()(feats, lengths), feats)
    aug.train()
    g = torch.Generator().manual_seed(1)
    out = aug(feats, lengths, generator=g)
    assert torch.equal(out, aug(feats, lengths, generator=torch.Generator().manual_seed(1)))
    for i, n in enumerate(lengths.tolist()):
        row = out[i, :n]
        masked_bins = int((row == 0).all(0).sum())
        masked_frames = int((row == 0).all(1).sum())
        assert masked_bins <= 2 * 10
        assert masked_frames <= 2 * min(40, int(n * 0.1))
        zeros = (row == 0)
        # every zero lies in a fully masked bin or frame
        assert torch.equal(zeros, (row == 0).all(0)[None, :] | (row == 0).all(1)[:, None])
    many = sum(int((aug(feats, lengths, generator=g)[0] == 0).any()) for _ in range(20))
    assert many >= 15  # masks are drawn, not a no-op


@pytest.mark.parametrize("warp", [0.88, 0.95, 1.0, 1.07, 1.12])
def test_warped_mel_filters_equal_kaldi_native_fbank_vtln(warp):
    """Vocal tract length perturbation's filters are Kaldi's VTLN filters for that factor."""
    import kaldi_native_fbank as knf

    mel_opts, frame_opts = knf.MelBanksOptions(), knf.FrameExtractionOptions()
    mel_opts.num_bins = 80
    ref = np.array(knf.MelBanks(mel_opts, frame_opts, warp).get_matrix(), dtype=np.float64)
    ours = mel_filterbank(FbankOptions(), warp).double().numpy()
    assert ours.shape == (80, 256) and ref.shape == (80, 257)
    assert not ref[:, 256].any()  # the Nyquist bin is in no filter (see the module docstring)
    np.testing.assert_allclose(ours, ref[:, :256], atol=1e-4, rtol=0)  # theirs in float32
    if warp != 1.0:  # not vacuous: the warp moves the filters
        assert np.abs(ours - mel_filterbank(FbankOptions()).double().numpy()).max() > 0.1


def test_warped_features_row_by_row_and_the_direction_of_the_warp():
    """A batch with a warp per row equals each row computed alone with its warp; no warps and
    warps of 1 are the plain features; a factor above 1 moves a tone's energy to higher bins
    (each filter listens 1/factor lower)."""
    waves = [_signal(s, seed) for seed, s in enumerate((1.0, 0.7, 0.43))]
    batch = torch.zeros(len(waves), max(len(w) for w in waves))
    for i, w in enumerate(waves):
        batch[i, : len(w)] = torch.from_numpy(w * 32768)
    lengths = torch.tensor([len(w) for w in waves])
    warps = [0.9, 1.0, 1.1]
    feats, frames = LogMel()(batch, lengths, warps)
    plain, _ = LogMel()(batch, lengths)
    torch.testing.assert_close(LogMel()(batch, lengths, [1.0, 1.0, 1.0])[0], plain, rtol=0, atol=0)
    for i, w in enumerate(warps):
        alone, _ = LogMel()(batch[i: i + 1, : lengths[i]], lengths[i: i + 1], [w])
        n = int(frames[i])
        torch.testing.assert_close(feats[i, :n], alone[0, :n], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(feats[1], plain[1], rtol=1e-5, atol=1e-4)
    assert (feats[0] - plain[0]).abs().max() > 0.5
    t = torch.arange(16000) / 16000
    tone = (0.3 * torch.sin(2 * torch.pi * 1000 * t) * 32768)[None]
    peak = {w: int(LogMel()(tone, None, [w])[0][0].mean(0).argmax()) for w in (0.9, 1.0, 1.1)}
    assert peak[0.9] < peak[1.0] < peak[1.1], peak
