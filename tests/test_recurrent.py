"""Recurrent baselines through the shared search, scheduled sampling, and normalization choice."""

import pytest
import torch
from torch import nn

from conftest import write_config
from encdec.cli import main
from encdec.config import DecodeConfig, ModelConfig
from encdec.data.vocab import BOS, EOS, PAD
from encdec.decoding import beam_search, generate
from encdec.losses import sequence_loss
from encdec.models import build_model
from encdec.nn.norms import MaskedBatchNorm
from encdec.scheduled_sampling import mix_predictions
from encdec.translate import Translator

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                    reason="no CUDA device"))


SRC = torch.tensor([[5, 6, 7, 8, 9], [7, 5, PAD, PAD, PAD], [9, 8, 7, 6, PAD]])
TGT_IN = torch.tensor([[BOS, 4, 5, 6, 7], [BOS, 8, 4, PAD, PAD], [BOS, 9, 5, 4, 6]])


def rnn(arch="lstm", attention="luong", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, d_model=16, enc_layers=2, dec_layers=2, dropout=0.0,
                      rnn_attention=attention, **kw)
    return build_model(cfg, 12, 12).eval()


CASES = [("lstm", "luong"), ("lstm", "bahdanau"), ("gru", "luong"), ("gru", "bahdanau")]


@pytest.mark.parametrize("arch, attention", CASES)
def test_step_by_step_equals_teacher_forced(arch, attention):
    model = rnn(arch, attention)
    enc = model.encode(SRC)
    hidden, weights = model.decode(TGT_IN, enc, need_attention=True)
    full = torch.log_softmax(model.logits(hidden), -1)
    state = model.init_state(model.encode(SRC))
    for t in range(TGT_IN.size(1)):
        lp, att = model.decode_step(TGT_IN[:, t], state, need_attention=True)
        torch.testing.assert_close(lp, full[:, t], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(att, weights[:, t], atol=1e-6, rtol=1e-5)
    assert weights[1, :, 2:].abs().max() == 0  # padding gets no attention


@pytest.mark.parametrize("arch, attention", CASES)
def test_beam_one_is_greedy_and_batched_beam_is_per_input(arch, attention):
    model = rnn(arch, attention)
    greedy = generate(model, SRC, DecodeConfig(method="greedy", max_len_a=1.0, max_len_b=4))
    # beam_search itself, not generate(), which routes a beam of 1 to greedy
    beam1 = beam_search(model, SRC, beam_size=1, nbest=1, length_penalty=0.0, max_len_a=1.0,
                        max_len_b=4)
    assert [h[0].tokens for h in greedy] == [h[0].tokens for h in beam1]
    for g, b in zip(greedy, beam1):
        assert g[0].score == pytest.approx(b[0].score, abs=1e-5)
    cfg = DecodeConfig(method="beam", beam_size=4, nbest=3, max_len_a=1.0, max_len_b=4)
    batched = generate(model, SRC, cfg)
    for i in range(SRC.size(0)):
        length = int(SRC[i].ne(PAD).sum())
        alone = generate(model, SRC[i:i + 1, :length], cfg)[0]
        assert [h.tokens for h in alone] == [h.tokens for h in batched[i]]
        for a, b in zip(alone, batched[i]):
            assert a.score == pytest.approx(b.score, abs=1e-5)


class _Batch:
    def __init__(self, src, tgt_in):
        self.src_tokens, self.tgt_in = src, tgt_in
        self.tgt_out = torch.cat([tgt_in[:, 1:], torch.full((tgt_in.size(0), 1), PAD)], 1)
        self.tgt_out[self.tgt_out.eq(PAD) & tgt_in.ne(PAD)] = EOS
        self.tgt_out[:, -1] = torch.where(tgt_in[:, -1].ne(PAD), EOS, PAD)


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_sampling_probability_zero_is_teacher_forcing(arch):
    model = rnn() if arch == "lstm" else build_model(
        ModelConfig(d_model=16, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=32, dropout=0.0), 12, 12)
    model.train()
    batch = _Batch(SRC, TGT_IN)
    torch.manual_seed(3)
    a = sequence_loss(model, batch, 0.1)[0]
    torch.manual_seed(3)
    b = sequence_loss(model, batch, 0.1, sampling=1e-12)[0]  # the sampling path, never sampling
    assert a.item() == b.item()


def test_rnn_sampling_probability_one_feeds_only_predictions():
    model = rnn()
    model.train()  # dropout is 0: training mode changes nothing but the sampling branch
    tgt_in = torch.tensor([[BOS, 4, 5, 6, 7, 8]] * 3)
    hidden = model(SRC, tgt_in, sampling_prob=1.0)
    # Free running: every input after BOS is the previous step's argmax, whatever tgt_in says.
    state = model.init_state(model.encode(SRC))
    prev = tgt_in[:, 0]
    for t in range(tgt_in.size(1)):
        lp, _ = model.decode_step(prev, state)
        torch.testing.assert_close(lp, torch.log_softmax(model.logits(hidden[:, t]), -1),
                                   atol=1e-5, rtol=1e-5)
        prev = lp.argmax(-1)


def test_two_pass_sampling_feeds_first_pass_predictions():
    tgt_in = TGT_IN
    predicted = torch.arange(100, 115).view(3, 5)
    mixed = mix_predictions(tgt_in, predicted, 1.0)
    assert mixed[:, 0].tolist() == [BOS] * 3
    assert mixed[0, 1:].tolist() == [100, 101, 102, 103]  # the prediction made one step before
    assert mixed[1].tolist() == [BOS, 105, 106, PAD, PAD]  # padding stays padding
    assert torch.equal(mix_predictions(tgt_in, predicted, 0.0), tgt_in)
    # Through the loss: the second pass sees BOS + the first pass's argmax.
    model = build_model(ModelConfig(d_model=16, n_heads=2, enc_layers=1, dec_layers=1, ffn_dim=32,
                                    dropout=0.0), 12, 12).train()
    seen = []
    handle = model.tgt_embed.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    sequence_loss(model, _Batch(SRC, tgt_in), 0.0, sampling=1.0)
    handle.remove()
    first, second = seen
    assert torch.equal(first, tgt_in)
    with torch.no_grad():
        expected = model.logits(model(SRC, tgt_in)).argmax(-1)
    assert torch.equal(second, mix_predictions(tgt_in, expected, 1.0))


def test_batchnorm_statistics_ignore_padding():
    torch.manual_seed(0)
    bn = MaskedBatchNorm(8).train()
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    out = bn(x, mask)
    ref = nn.BatchNorm1d(8).train()
    torch.testing.assert_close(out[mask], ref(x[mask]))
    assert out[~mask].abs().max() == 0
    y = x.clone()
    y[~mask] = 1000.0  # whatever sits in the padding
    torch.testing.assert_close(MaskedBatchNorm(8).train()(y, mask)[mask], out[mask])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_batchnorm_equals_pytorch_batchnorm_on_the_real_positions(momentum, sync_free, device):
    """Both ways (positions picked out, or masked sums with no device sync): outputs,
    gradients and running statistics (unbiased variance, exponential or cumulative average)
    over three steps equal nn.BatchNorm1d given the real positions only; in eval mode both
    use the running statistics."""
    torch.manual_seed(1)
    ours = MaskedBatchNorm(6, momentum=momentum).to(device).train()
    ours.sync_free = sync_free
    ref = nn.BatchNorm1d(6, momentum=momentum).to(device).train()
    with torch.no_grad():
        for bn in (ours, ref):
            bn.weight.copy_(torch.linspace(0.5, 1.5, 6))
            bn.bias.copy_(torch.linspace(-1, 1, 6))
    for _ in range(3):
        x = (torch.randn(4, 7, 6, device=device) * 3 + 2).requires_grad_()
        mask = torch.rand(4, 7, device=device) < 0.6
        mask[:, 0] = True
        xr = x.detach().clone().requires_grad_()
        out, expected = ours(x, mask), ref(xr[mask])
        torch.testing.assert_close(out[mask], expected)
        grad = torch.randn_like(expected)
        out[mask].backward(grad)
        expected.backward(grad)
        torch.testing.assert_close(x.grad, xr.grad)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name))
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
    x = torch.randn(2, 3, 6, device=device)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x.reshape(-1, 6)).view(2, 3, 6))


@pytest.mark.parametrize("norm_type", ["batchnorm", "rmsnorm", "layernorm"])
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_transformer_norms_ignore_padding(norm_type, norm):
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=16, n_heads=2, enc_layers=2, dec_layers=2, ffn_dim=32, dropout=0.0,
                      norm=norm, norm_type=norm_type)
    model = build_model(cfg, 12, 12).train()  # batch statistics in use
    padded_src = torch.cat([SRC, torch.full((3, 3), PAD)], 1)
    padded_tgt = torch.cat([TGT_IN, torch.full((3, 2), PAD)], 1)
    a = model(SRC, TGT_IN)
    b = model(padded_src, padded_tgt)[:, :TGT_IN.size(1)]
    real = TGT_IN.ne(PAD)
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)
    # Cached decoding (eval: running statistics) equals teacher-forced decoding.
    model.eval()
    full = torch.log_softmax(model.logits(model(SRC, TGT_IN)), -1)
    state = model.init_state(model.encode(SRC))
    for t in range(TGT_IN.size(1)):
        lp, _ = model.decode_step(TGT_IN[:, t], state)
        torch.testing.assert_close(lp[real[:, t]], full[:, t][real[:, t]], atol=1e-5, rtol=1e-5)


def test_lstm_run_through_the_cli(tiny_data, tmp_path):
    cfg = write_config(tmp_path / "lstm.yaml", tiny_data, tmp_path / "run", max_steps=40,
                       valid_every=20, scheduled_sampling="linear", ss_steps=20)
    cfg.write_text(cfg.read_text().replace("model:\n", "model:\n  arch: gru\n  rnn_attention: bahdanau\n"))
    assert main(["train", str(cfg)]) == 0
    tr = Translator.from_run(tmp_path / "run")
    out = tr.translate_nbest(["abc", "", "hgfedcba"], beam_size=3, nbest=2, need_attention=True)
    assert len(out) == 3 and len(out[0]) == 2
    assert out[0][0].attention.shape == (len(out[0][0].tokens) + 1, 3)


def pack_rnn_weights(model: nn.Module, device: str = "cpu") -> nn.Module:
    """Every RNN's weights as views into one flat buffer: what cuDNN does on a GPU, done by
    hand on the CPU."""
    if device != "cpu":
        return model.to(device)  # cuDNN packs them itself
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            params = list(module.parameters(recurse=False))
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            offset = 0
            for p in params:
                p.data = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
    return model


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("arch", ["lstm", "gru"])
def test_checkpoint_of_packed_rnn_weights_round_trips(arch, device, tmp_path):
    """A GPU-trained RNN holds its weights packed in one buffer (cuDNN): the checkpoint stores
    each weight on its own and tied weights once, and loads into a packed or a plain model;
    the raw weights a weight average keeps load back the same."""
    from safetensors.torch import load_file

    from encdec import checkpoint

    model = pack_rnn_weights(rnn(arch, tie_output=True), device)
    rnns = [m for m in model.modules() if isinstance(m, nn.RNNBase)]
    assert rnns and all(len({p.untyped_storage().data_ptr() for p in m.parameters()}) == 1
                        for m in rnns)
    state = model.state_dict()
    raw = {f"raw.{k}": v.detach().clone() for k, v in state.items()}
    path = checkpoint.save_checkpoint(tmp_path, 5, model, torch.optim.AdamW(model.parameters()),
                                      {"step": 5}, raw, is_best=True, keep=2)
    names = set(load_file(str(path / "model.safetensors")))
    left_out = set(state) - names
    assert left_out, "the tied output layer is stored once"
    for name in left_out:
        assert any(state[k].data_ptr() == state[name].data_ptr() for k in names)
    for packed in (True, False):
        target = rnn(arch, tie_output=True)
        with torch.no_grad():
            for p in target.parameters():
                p.zero_()
        target = pack_rnn_weights(target, device) if packed else target.to(device)
        checkpoint.load_weights(target, path)
        for name, value in target.state_dict().items():
            assert torch.equal(value, state[name]), name
    raw_back = checkpoint.raw_weights(path)
    assert raw_back.keys() == names
    assert all(torch.equal(raw_back[k], state[k].cpu()) for k in names)
