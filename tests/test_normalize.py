"""Global mean and variance normalization from training statistics, saved and loaded."""

import torch

from encdec.audio import FeatureStats


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
