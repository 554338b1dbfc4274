"""SpecAugment: masks within their limits, seeded, and only in training."""

import torch

from encdec.audio import SpecAugment


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
