"""The speech front end's log-mel features (``encdec/audio/features.py``): Kaldi-compatible,
checked against kaldi-native-fbank, batched, and warped for vocal tract length perturbation."""

import numpy as np
import pytest
import torch

from encdec.audio import FbankOptions, LogMel, num_frames
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
