"""The feed-forward block on flattened rows against the plain composition."""

import torch


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
