"""oneDNN-packed linear layers for CPU inference: same products, same parameters, fresh after
the weights change, and untouched training."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import train_metrics
from encdec.data.dataset import read_eval
from encdec.data.vocab import BOS
from encdec.nn import packed
from encdec.nn.packed import (PackedLinear, forget_packed_weights, pack_linear_weights,
                              unpack_linear_weights)
from encdec.translate import Translator

pytestmark = pytest.mark.skipif(not packed.available(),
                                reason="this PyTorch build has no oneDNN inner product")


@pytest.fixture
def always_packed(monkeypatch):
    """Take the packed path for every size (tiny test layers are below MIN_MACS)."""
    monkeypatch.setattr(packed, "MIN_MACS", 0)


@pytest.mark.parametrize("shape", [(1, 24), (7, 24), (3, 5, 24), (2, 0, 24), (24,)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_linear(always_packed, shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(24, 40, bias=bias).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = F.linear(x, lin.weight, lin.bias)
        assert pack_linear_weights(lin) == 1 and type(lin) is PackedLinear
        out = lin(x)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    if x.numel():
        assert lin._packed is not None  # the packed path ran


def test_packed_linear_follows_new_weights(always_packed):
    torch.manual_seed(0)
    lin, other = nn.Linear(16, 16).eval(), nn.Linear(16, 16)
    x = torch.randn(4, 16)
    pack_linear_weights(lin)
    with torch.inference_mode():
        before = lin(x)
    lin.load_state_dict(other.state_dict())  # in place, as checkpoint loading does
    with torch.inference_mode():
        after = lin(x)
        torch.testing.assert_close(after, F.linear(x, other.weight, other.bias),
                                   rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, after)
    with torch.no_grad():
        lin.weight.mul_(2)  # an in-place update (an optimizer step, a weight average)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(5, 8), (3, 4, 8)])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_trains_like_linear(always_packed, shape, bias):
    """With autograd: the same output and the same gradients for the input, the weight and the
    bias (up to rounding), through oneDNN's product and input gradient."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 6, bias=bias)
    ref = nn.Linear(8, 6, bias=bias)
    ref.load_state_dict(lin.state_dict())
    pack_linear_weights(lin)
    x = torch.randn(*shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, expected = lin(x), ref(x_ref)
    assert out.grad_fn is not None and "PackedLinear" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(lin.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
    # an optimizer step changes the weight in place: the next forward packs it again
    with torch.no_grad():
        lin.weight.sub_(0.1 * lin.weight.grad)
        ref.weight.sub_(0.1 * ref.weight.grad)
    torch.testing.assert_close(lin(x), ref(x_ref), rtol=1e-5, atol=1e-5)


def test_packed_model_copies_and_pickles(always_packed):
    """deepcopy (the weight average copies the model) and pickling leave the opaque packed
    tensors behind; the copy packs its own."""
    import copy
    import pickle

    lin = nn.Linear(8, 8).eval()
    pack_linear_weights(lin)
    x = torch.randn(2, 8)
    with torch.no_grad():
        y = lin(x)
        twin = copy.deepcopy(lin)
        torch.testing.assert_close(twin(x), y)
        torch.testing.assert_close(pickle.loads(pickle.dumps(lin))(x), y)


def test_packing_keeps_parameters_and_state_dict(tiny_run):
    tr = Translator.from_run(tiny_run)
    assert any(type(m) is PackedLinear for m in tr.model.modules())  # a CPU Translator packs
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    n = unpack_linear_weights(tr.model)
    assert n > 0 and not any(type(m) is PackedLinear for m in tr.model.modules())
    assert pack_linear_weights(tr.model) == n
    after = tr.model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_packed_decoding_equals_plain_decoding(tiny_run, always_packed):
    """Greedy and beam search on the tiny run give the same outputs with and without packing,
    and one decoder step the same log-probabilities up to rounding."""
    tr = Translator.from_run(tiny_run)
    words = [e["src"] for e in read_eval(tr.cfg.data.dir, "test")]
    assert packed.MIN_MACS == 0
    outs = {}
    for kind in ("packed", "plain"):
        if kind == "plain":
            unpack_linear_weights(tr.model)
        outs[kind] = (tr.translate(words, method="greedy"),
                      tr.translate(words, method="beam", beam_size=3))
        src = torch.tensor([tr.assets.src_vocab.encode(tr.assets.src_tokenizer.encode(words[0]))])
        with torch.inference_mode():
            state = tr.model.init_state(tr.model.encode(src))
            outs[kind + " step"] = tr.model.decode_step(torch.tensor([BOS]), state)[0]
        if kind == "packed":
            assert all(m._packed is not None for m in tr.model.modules()
                       if type(m) is PackedLinear)  # every layer took the packed path
    assert outs["packed"] == outs["plain"]
    torch.testing.assert_close(outs["packed step"], outs["plain step"], rtol=1e-4, atol=1e-5)


def test_training_with_packed_layers_follows_plain_training(tiny_data, tmp_path, always_packed):
    """The trainer (fused AdamW, which updates weights without bumping their version; dropout;
    validation in between) with every linear layer on oneDNN gives the losses and dev scores of
    plain F.linear training, up to rounding. Fails if a forward reuses stale packed weights."""
    records = {}
    for packed_linear in (True, False):
        _, records[packed_linear] = train_metrics(tmp_path, tiny_data, str(packed_linear),
                                                  max_steps=40, valid_every=20, log_every=10,
                                                  packed_linear=packed_linear)
    packed_run, plain_run = records[True], records[False]
    assert [r["step"] for r in packed_run] == [r["step"] for r in plain_run]
    for a, b in zip(packed_run, plain_run):
        for key in ("loss", "valid_loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=2e-3, abs=2e-3), (a["step"], key)


def test_forget_drops_the_eval_copies(always_packed):
    lin = nn.Linear(8, 8).eval()
    pack_linear_weights(lin)
    with torch.no_grad():
        lin(torch.randn(2, 8))
        assert lin._packed is not None
        forget_packed_weights(lin)
        assert lin._packed is None
