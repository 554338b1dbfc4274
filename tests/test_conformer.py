import math

import pytest
import torch

from encdec.nn.attention import KVCache, MultiHeadAttention
from encdec.nn.conformer import ConformerLayer
from encdec.nn.rotary import Rotary

# ---- rotary positions ---------------------------------------------------------------------

def test_rotary_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    rotary = Rotary(8)
    T = 12
    q = torch.randn(8).expand(1, 1, T, 8)  # the same query and key vector at every position
    k = torch.randn(8).expand(1, 1, T, 8)
    scores = (rotary.rotate(q) @ rotary.rotate(k).transpose(-2, -1))[0, 0]  # (T, T)
    # shifting query and key by the same amount leaves the score unchanged (Toeplitz matrix)
    torch.testing.assert_close(scores[1:, 1:], scores[:-1, :-1], atol=1e-5, rtol=1e-5)
    # ... while the score does change with the distance i - j (positions are seen at all)
    assert not torch.allclose(scores[0, 0], scores[0, 3], atol=1e-3)
    # an offset continues the positions: positions 5.. of a long run equal offset 5
    x = torch.randn(2, 3, T, 8)
    torch.testing.assert_close(rotary.rotate(x)[:, :, 5:], rotary.rotate(x[:, :, 5:], offset=5))


def test_rotary_preserves_norms_and_leaves_position_zero_alone():
    torch.manual_seed(1)
    rotary = Rotary(16)
    x = torch.randn(2, 4, 10, 16)
    y = rotary.rotate(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])


def _reference_attention_with_rope(attn: MultiHeadAttention, x, pad):
    """Rotary self-attention written out from the formulas, on ``attn``'s weights."""
    B, T, d = x.shape
    nh, hd = attn.n_heads, attn.head_dim
    q, k, v = (x @ attn.qkv_proj.weight.T + attn.qkv_proj.bias).chunk(3, dim=-1)
    q, k, v = (t.view(B, T, nh, hd).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
    theta = torch.tensor([10000.0 ** (-2 * i / hd) for i in range(hd // 2)])
    angle = torch.arange(T, dtype=torch.float32)[:, None] * theta  # (T, hd/2)
    cos, sin = angle.cos().repeat(1, 2), angle.sin().repeat(1, 2)  # (T, hd)

    def rope(t):
        rotated = torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], dim=-1)
        return t * cos + rotated * sin

    scores = rope(q) @ rope(k).transpose(-2, -1) / math.sqrt(hd)  # (B, nh, T, T)
    scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, d)
    return out @ attn.out_proj.weight.T + attn.out_proj.bias


def test_rotary_attention_equals_reference():
    torch.manual_seed(2)
    attn = MultiHeadAttention(32, 4).eval()
    x = torch.randn(3, 9, 32)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 6:] = pad[2, 2:] = True
    expected = _reference_attention_with_rope(attn, x, pad)
    rotary = Rotary(attn.head_dim)
    out, _ = attn(x, attn_mask=~pad[:, None, None, :], rotary=rotary)  # SDPA kernel
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out_w, _ = attn(x, attn_mask=~pad[:, None, None, :], rotary=rotary, need_weights=True)
    torch.testing.assert_close(out_w, expected, atol=1e-5, rtol=1e-5)


def test_rotary_cached_steps_equal_full_causal_run():
    torch.manual_seed(3)
    attn, rotary = MultiHeadAttention(32, 4).eval(), Rotary(8)
    x = torch.randn(2, 6, 32)
    full, _ = attn(x, is_causal=True, rotary=rotary)
    cache = KVCache()
    steps = [attn(x[:, t:t + 1], cache=cache, rotary=rotary)[0] for t in range(6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_rotary_is_refused_for_cross_attention():
    attn = MultiHeadAttention(32, 4, cross=True)
    with pytest.raises(ValueError, match="self-attention only"):
        attn(torch.randn(1, 2, 32), torch.randn(1, 3, 32), rotary=Rotary(8))


# ---- Conformer layer ----------------------------------------------------------------------

def test_conformer_padded_batch_equals_each_sequence_alone():
    torch.manual_seed(4)
    layer = ConformerLayer(32, 4, 64, kernel_size=7).eval()
    rotary = Rotary(8)
    lengths = torch.tensor([13, 9, 4])
    T = int(lengths.max())
    x = torch.randn(3, T, 32)
    pad_mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T), True at real positions
    x = x.masked_fill(~pad_mask[..., None], 1e3)  # loud padding, so any leak shows
    with torch.no_grad():
        batch = layer(x, pad_mask[:, None, None, :], pad_mask, rotary)
        for i, n in enumerate(lengths.tolist()):
            alone = layer(x[i:i + 1, :n], None, None, rotary)
            torch.testing.assert_close(batch[i:i + 1, :n], alone, atol=1e-5, rtol=1e-5)


def test_conformer_output_shape_and_gradient_reaches_every_parameter():
    torch.manual_seed(5)
    layer = ConformerLayer(32, 4, 64, kernel_size=5).train()
    pad_mask = torch.ones(2, 10, dtype=torch.bool)
    pad_mask[1, 7:] = False
    out = layer(torch.randn(2, 10, 32), pad_mask[:, None, None, :], pad_mask, Rotary(8))
    assert out.shape == (2, 10, 32)
    out[pad_mask].pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
