"""encdec's CPU dropout: the mask's statistics, gradient, determinism, and its uses."""

import pytest
import torch
import torch.nn.functional as F

from encdec.nn.dropout import Dropout, dropout, dropout_mask, residual_dropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_mask_rate_per_lane_and_scale(p):
    torch.manual_seed(0)
    x = torch.ones(1000, 4000)
    m = dropout_mask(x, p)
    dropped = round(p * 65536)
    scale = 65536 / (65536 - dropped)
    assert set(torch.unique(m).tolist()) == pytest.approx([0.0, scale])
    rate = (m == 0).float()
    # four uniforms come from each 64-bit draw: every lane of the four must drop at rate p
    # (4M elements: the standard error of a lane's rate is below 5e-4)
    for lane in range(4):
        assert float(rate.view(-1)[lane::4].mean()) == pytest.approx(p, abs=2e-3)
    assert float(m.mean()) == pytest.approx(1.0, abs=3e-3)  # expectation kept
    # neighbours are independent: both dropped at rate p^2
    flat = rate.view(-1)
    assert float((flat[:-1] * flat[1:]).mean()) == pytest.approx(p * p, abs=2e-3)


def test_gradient_follows_the_mask_and_seed_reproduces_it():
    x = torch.randn(37, 53, requires_grad=True)  # an element count not divisible by 4
    torch.manual_seed(5)
    y = dropout(x, 0.2)
    y.sum().backward()
    kept = y != 0
    assert torch.equal(x.grad != 0, kept)
    assert torch.allclose(x.grad[kept], torch.full_like(x.grad[kept], 65536 / (65536 - 13107)))
    torch.manual_seed(5)
    assert torch.equal(dropout(x, 0.2), y)
    assert not torch.equal(dropout(x, 0.2), y)  # the generator moved on


def test_identity_when_off_and_residual_form():
    x, h = torch.randn(8, 16), torch.randn(8, 16)
    assert dropout(x, 0.3, training=False) is x
    assert dropout(x, 0.0) is x
    d = Dropout(0.3).eval()
    assert d(x) is x
    torch.manual_seed(1)
    a = residual_dropout(x, h, 0.3, True)
    torch.manual_seed(1)
    assert torch.allclose(a, x + dropout(h, 0.3))
    assert torch.equal(residual_dropout(x, h, 0.3, False), x + h)
    # p = 1 (nothing kept) falls back to PyTorch's dropout
    assert torch.equal(dropout(x, 1.0), F.dropout(x, 1.0))
