"""The label-smoothed loss and its one-pass gradient against PyTorch's cross-entropy and autograd."""

import torch


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


def test_output_layer_loss_in_chunks_equals_logits_then_loss():
    """The output layer with the loss passes made chunk by chunk in the logits' buffer against
    the whole logits then ``label_smoothed_nll``: values, and gradients of the hidden rows, the
    weight and the bias; PAD rows, a last chunk shorter than the others, without a gradient
    (validation), and a second backward (retain_graph) giving the same gradients."""
    import torch.nn.functional as F
    from torch import nn

    from encdec import losses

    torch.manual_seed(2)
    V, d = 1500, 24
    hidden = torch.randn(70, d)
    target = torch.randint(1, V, (70,))
    target[[3, 69]] = 0  # PAD rows
    for bias in (False, True):
        output = nn.Linear(d, V, bias=bias)

        class Core:  # the two attributes a model gives the loss
            def __init__(self):
                self.output = output

            def logits(self, h):
                return output(h)

        for smoothing in (0.0, 0.1):
            for rows in (16, 32, 70):
                old = losses.CHUNK_LOGITS
                losses.CHUNK_LOGITS = rows * V  # 70 rows: chunks of 16 (+6) or 32 (+6) or one
                try:
                    h1 = hidden.clone().requires_grad_()
                    loss, nll = losses.output_layer_loss(Core(), h1, target, smoothing)
                finally:
                    losses.CHUNK_LOGITS = old
                grads = torch.autograd.grad(0.37 * loss, [h1, *output.parameters()])
                h2 = hidden.clone().requires_grad_()
                ref, ref_nll = losses.label_smoothed_nll(F.linear(h2, output.weight, output.bias),
                                                         target, smoothing)
                ref_grads = torch.autograd.grad(0.37 * ref, [h2, *output.parameters()])
                torch.testing.assert_close(loss, ref)
                torch.testing.assert_close(nll, ref_nll)
                for g, r in zip(grads, ref_grads):
                    torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
                assert bool((grads[0][[3, 69]] == 0).all())
        with torch.no_grad():
            loss, nll = losses.output_layer_loss(Core(), hidden, target, 0.1)
        torch.testing.assert_close(loss, losses.label_smoothed_nll(output(hidden), target, 0.1)[0])
    h = hidden.clone().requires_grad_()
    loss, _ = losses.output_layer_loss(Core(), h, target, 0.1)
    first, = torch.autograd.grad(loss, h, retain_graph=True)
    second, = torch.autograd.grad(loss, h)
    assert torch.equal(first, second)


def test_sequence_loss_chunked_equals_whole_logits_on_every_parameter():
    """Training through a Transformer with a large vocabulary (the chunked path) and with the
    chunking turned off give the same loss and the same gradient on every parameter, the
    shared embedding-output matrix included."""
    from encdec import losses
    from encdec.config import ModelConfig
    from encdec.data.vocab import BOS, EOS, PAD
    from encdec.models import build_model

    V = 1200
    torch.manual_seed(4)
    model = build_model(ModelConfig(d_model=16, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=32,
                                    dropout=0.0, share_embeddings=True, tie_output=True), V, V)

    class Batch:
        src_tokens = torch.randint(4, V, (3, 6))
        tgt_in = torch.cat([torch.full((3, 1), BOS), torch.randint(4, V, (3, 5))], 1)
        tgt_out = torch.cat([tgt_in[:, 1:], torch.full((3, 1), EOS)], 1)
    Batch.src_tokens[1, 4:] = PAD
    Batch.tgt_in[2, 3:] = PAD
    Batch.tgt_out[2, 2], Batch.tgt_out[2, 3:] = EOS, PAD
    assert model.output.weight is model.tgt_embed.tokens.weight

    def loss_and_grads(chunked):
        old = losses.CHUNK_LOGITS
        losses.CHUNK_LOGITS = 4 * V  # chunks of 4 rows
        try:
            model.zero_grad()
            loss, nll = losses.sequence_loss(model, Batch, 0.1, chunked=chunked)
            loss.backward()
        finally:
            losses.CHUNK_LOGITS = old
        return loss, nll, {n: p.grad.clone() for n, p in model.named_parameters()}

    chunked, whole = loss_and_grads(True), loss_and_grads(False)
    torch.testing.assert_close(chunked[0], whole[0])
    torch.testing.assert_close(chunked[1], whole[1])
    assert chunked[2].keys() == whole[2].keys()
    for name in whole[2]:
        torch.testing.assert_close(chunked[2][name], whole[2][name], atol=1e-6, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_in_place_log_softmax_falls_back_where_pytorch_refuses_out(monkeypatch):
    """``_log_softmax_`` writes the log-softmax over its input, through ``torch._log_softmax``'s
    ``out=`` or, where a PyTorch build refuses that, through a copy: both equal
    ``torch.log_softmax`` and leave the result in the input's buffer."""
    from encdec import losses

    x = 3 * torch.randn(6, 50)
    expected = torch.log_softmax(x, dim=-1)
    a = x.clone()
    assert losses._log_softmax_(a).data_ptr() == a.data_ptr()
    torch.testing.assert_close(a, expected)

    def refuses(*args, **kwargs):
        raise TypeError("no out= here")

    monkeypatch.setattr(torch, "_log_softmax", refuses)
    b = x.clone()
    assert losses._log_softmax_(b).data_ptr() == b.data_ptr()
    torch.testing.assert_close(b, expected)
