"""Convolutional subsampling: output lengths, and padding never reaching real positions."""

import pytest
import torch

from encdec.nn.subsampling import Conv2dSubsampling


@pytest.mark.parametrize("factor", [4, 6, 8])
def test_output_lengths_and_padding_independence(factor):
    torch.manual_seed(0)
    sub = Conv2dSubsampling(num_bins=20, d_model=16, factor=factor, channels=4).eval()
    lengths = torch.tensor([100, 37, sub.min_frames()])
    feats = torch.randn(3, 100, 20)
    out, out_lengths = sub(feats, lengths)
    assert out.shape[:2] == (3, int(sub.output_lengths(torch.tensor([100]))[0]))
    assert out_lengths[2] == 1
    # about T / factor positions
    assert abs(int(out_lengths[0]) - 100 / factor) <= 3
    for i, n in enumerate(lengths.tolist()):
        garbage = feats.clone()
        garbage[i, n:] = 1e6  # whatever lies past an utterance's end
        alone, alone_len = sub(feats[i:i + 1, :n], lengths[i:i + 1])
        again, _ = sub(garbage, lengths)
        k = int(out_lengths[i])
        assert int(alone_len[0]) == k == alone.size(1)
        torch.testing.assert_close(alone[0], out[i, :k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again[i, :k], out[i, :k], atol=1e-5, rtol=1e-5)


def test_too_short_input_is_a_clear_error():
    sub = Conv2dSubsampling(num_bins=20, d_model=16, factor=4, channels=4)
    assert sub.min_frames() == 7
    with pytest.raises(ValueError, match="fewer than the 7"):
        sub(torch.randn(1, 6, 20), torch.tensor([6]))
    with pytest.raises(ValueError, match="choose one of"):
        Conv2dSubsampling(num_bins=20, d_model=16, factor=3)
