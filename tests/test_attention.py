import torch
from torch import nn

from encdec.nn.attention import MultiHeadAttention


def _copy_into_torch(ours: MultiHeadAttention, ref: nn.MultiheadAttention):
    with torch.no_grad():
        if ours.cross:
            ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.kv_proj.weight]))
            ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.kv_proj.bias]))
        else:
            ref.in_proj_weight.copy_(ours.qkv_proj.weight)
            ref.in_proj_bias.copy_(ours.qkv_proj.bias)
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)


def test_self_attention_equals_torch_multihead_attention():
    torch.manual_seed(0)
    ours = MultiHeadAttention(32, 4).eval()
    ref = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    _copy_into_torch(ours, ref)
    x = torch.randn(3, 7, 32)
    pad = torch.tensor([[False] * 7, [False] * 5 + [True] * 2, [False] * 3 + [True] * 4])
    out, _ = ours(x, attn_mask=~pad[:, None, None, :])
    expected, _ = ref(x, x, x, key_padding_mask=pad, need_weights=False)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_and_weights_equal_torch():
    torch.manual_seed(1)
    ours = MultiHeadAttention(32, 4, cross=True).eval()
    ref = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    _copy_into_torch(ours, ref)
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    out, weights = ours(x, memory, attn_mask=~pad[:, None, None, :], need_weights=True)
    expected, expected_w = ref(x, memory, memory, key_padding_mask=pad, need_weights=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.mean(dim=1), expected_w, atol=1e-5, rtol=1e-5)
    # The explicit path (used for attention maps) equals the SDPA kernel path.
    fast, _ = ours(x, memory, attn_mask=~pad[:, None, None, :])
    torch.testing.assert_close(out, fast, atol=1e-5, rtol=1e-5)


def test_causal_mask_hides_the_future():
    torch.manual_seed(2)
    attn = MultiHeadAttention(16, 2).eval()
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 16)  # change only the last two positions
    a, _ = attn(x, is_causal=True)
    b, _ = attn(y, is_causal=True)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    # and the explicit-weights path agrees, with zero weight above the diagonal
    c, w = attn(x, is_causal=True, need_weights=True)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    assert torch.all(w[0, :, 0, 1:] == 0)


def test_short_sequences_on_cpu_take_the_explicit_path_with_sdpa_results(monkeypatch):
    """Training-mode forward and backward on short keys (the explicit path on the CPU) give
    SDPA's outputs and gradients: padded keys, causal self-attention, cross-attention."""
    import encdec.nn.attention as attention

    torch.manual_seed(3)
    self_attn, cross_attn = MultiHeadAttention(32, 4).train(), MultiHeadAttention(32, 4, cross=True).train()
    x, memory = torch.randn(3, 6, 32), torch.randn(3, 9, 32)
    pad = torch.zeros(3, 9, dtype=torch.bool)
    pad[1, 5:] = True
    pad[2, 2:] = True
    mask = ~pad[:, None, None, :]

    def run():
        xs, ms = x.clone().requires_grad_(), memory.clone().requires_grad_()
        a = self_attn(ms, attn_mask=mask)[0]
        b = self_attn(xs, is_causal=True)[0]
        c = cross_attn(xs, ms, attn_mask=mask)[0]
        loss = (a * a.detach().cos()).sum() + (b * b.detach().sin()).sum() + (c * c.detach()).sum()
        loss.backward()
        grads = [p.grad.clone() for p in list(self_attn.parameters()) + list(cross_attn.parameters())]
        self_attn.zero_grad(), cross_attn.zero_grad()
        return [a, b, c, xs.grad, ms.grad] + grads

    calls = []
    explicit = attention._attention_with_weights
    monkeypatch.setattr(attention, "_attention_with_weights",
                        lambda *a: calls.append(1) or explicit(*a))
    short = run()
    assert len(calls) == 3  # all three took the explicit path (9 keys <= EXPLICIT_MAX_KEYS)
    monkeypatch.setattr(attention, "EXPLICIT_MAX_KEYS", 0)
    kernel = run()
    assert len(calls) == 3  # ... and none now
    for got, expected in zip(short, kernel):
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
