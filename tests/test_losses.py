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
