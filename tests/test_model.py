import sys
from pathlib import Path

import torch

from encdec.config import ModelConfig
from encdec.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from reference import ReferenceTransformer  # noqa: E402


def test_transformer_equals_torch_nn_transformer_with_same_weights():
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, enc_layers=2, dec_layers=2, ffn_dim=64, norm="pre")
    ours = build_model(cfg, 15, 17).eval()
    ref = ReferenceTransformer(cfg, 15, 17).load_encdec(ours).eval()
    src = torch.tensor([[4, 5, 6, 7], [8, 9, 0, 0]])
    tgt_in = torch.tensor([[1, 4, 5], [1, 6, 0]])
    with torch.no_grad():
        expected = ref.output(ref(src, tgt_in))
        got = ours.logits(ours(src, tgt_in))
    keep = tgt_in.ne(0)
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-4, rtol=1e-4)
    # and the reference's cached greedy and beam loops (benchmarks/decode_speed.py) give our
    # outputs, whole (an early or missing EOS would show)
    from encdec.decoding import beam_search, greedy

    ours_out = [h[0].tokens for h in greedy(ours, src, max_len_a=1.0, max_len_b=3)]
    assert ref.greedy(src, 1.0, 3) == ours_out
    ours_beam = [h[0].tokens for h in beam_search(ours, src, beam_size=3, length_penalty=1.0,
                                                  max_len_a=1.0, max_len_b=3)]
    assert ref.beam(src, 3, 1.0, 1.0, 3) == ours_beam


def test_tied_output_and_parameter_count():
    cfg = ModelConfig(d_model=256, n_heads=4, enc_layers=3, dec_layers=3, ffn_dim=1024)
    model = build_model(cfg, 31, 43)
    assert model.output.weight is model.tgt_embed.tokens.weight
    n = sum(p.numel() for p in model.parameters())
    assert 5.5e6 < n < 5.6e6  # g2p-small, as in the peer table


def test_label_smoothed_nll_equals_cross_entropy():
    import torch.nn.functional as F

    from encdec.losses import label_smoothed_nll

    torch.manual_seed(0)
    logits = torch.randn(7, 11, requires_grad=True)
    target = torch.tensor([3, 0, 5, 10, 4, 0, 1])  # 0 is PAD: ignored
    for smoothing in (0.0, 0.1):
        loss, nll = label_smoothed_nll(logits, target, smoothing)
        ref = F.cross_entropy(logits, target, label_smoothing=smoothing, ignore_index=0,
                              reduction="sum")
        torch.testing.assert_close(loss, ref)
        torch.testing.assert_close(nll, F.cross_entropy(logits, target, ignore_index=0,
                                                        reduction="sum"))
        g1, = torch.autograd.grad(loss, logits)
        g2, = torch.autograd.grad(ref, logits)
        torch.testing.assert_close(g1, g2)


def test_label_smoothed_nll_gradient_written_in_one_pass_equals_autograd():
    """The hand-written backward (softmax - (1 - s) onehot - s / V, zero on PAD rows, scaled
    by the incoming gradient) against autograd through log_softmax, gather and mean: a large
    vocabulary, PAD rows, bf16 logits; a second backward refuses instead of reusing a spent
    buffer."""
    import pytest
    import torch.nn.functional as F

    from encdec.losses import label_smoothed_nll

    def by_autograd(logits, target, smoothing):
        log_probs = F.log_softmax(logits.float(), dim=-1)
        keep = target.ne(0)
        nll = -log_probs.gather(1, target[:, None]).squeeze(1).masked_fill(~keep, 0.0)
        smooth = -log_probs.mean(dim=-1).masked_fill(~keep, 0.0)
        return ((1 - smoothing) * nll + smoothing * smooth).sum(), nll.sum()

    torch.manual_seed(1)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        base = (3 * torch.randn(64, 2000)).to(dtype)
        target = torch.randint(1, 2000, (64,))
        target[[5, 40]] = 0  # PAD rows
        for smoothing in (0.0, 0.1, 0.3):
            a, b = base.clone().requires_grad_(), base.clone().requires_grad_()
            loss, nll = label_smoothed_nll(a, target, smoothing)
            ref, ref_nll = by_autograd(b, target, smoothing)
            torch.testing.assert_close(loss, ref)
            torch.testing.assert_close(nll, ref_nll)
            assert not nll.requires_grad
            (0.37 * loss).backward()
            (0.37 * ref).backward()
            assert a.grad.dtype == dtype
            torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=tol, rtol=1e-4)
            assert bool((a.grad[[5, 40]] == 0).all())
    logits = torch.randn(4, 9, requires_grad=True)
    loss, _ = label_smoothed_nll(logits, torch.tensor([1, 2, 3, 4]), 0.1)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_feed_forward_on_flattened_rows_equals_the_plain_composition():
    """FeedForward flattens to 2-D for speed (no autograd copies); values and gradients are
    those of fc2(dropout(relu(fc1(x)))) on the 3-D input, bit for bit."""
    import torch.nn.functional as F

    from encdec.nn.layers import FeedForward

    torch.manual_seed(0)
    ff = FeedForward(16, 64)
    x = torch.randn(5, 7, 16, requires_grad=True)
    plain = ff.fc2(F.relu(ff.fc1(x)))
    ours = ff(x)
    assert ours.shape == (5, 7, 16) and torch.equal(plain, ours)
    g_plain = torch.autograd.grad(plain.square().sum(), [x, *ff.parameters()])
    g_ours = torch.autograd.grad(ours.square().sum(), [x, *ff.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(g_plain, g_ours))
