import math

import pytest
import torch

from encdec.config import DecodeConfig, ModelConfig
from encdec.data.vocab import BOS, EOS, PAD
from encdec.decoding import beam_search, generate, greedy, sample
from encdec.decoding.greedy import filter_logits
from encdec.models import build_model
from encdec.models.base import DecoderState, EncoderOut


def _model(norm="pre", positions="sinusoidal", seed=0, vocab=13):
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_heads=4, enc_layers=2, dec_layers=2, ffn_dim=64,
                      norm=norm, positions=positions, max_positions=64)
    return build_model(cfg, 11, vocab).eval()


def _src():
    src = torch.tensor([[4, 5, 6, 7, 8], [9, 4, 5, PAD, PAD], [6, 7, PAD, PAD, PAD]])
    return src


@pytest.mark.parametrize("norm,positions", [("pre", "sinusoidal"), ("post", "learned")])
def test_cached_decoding_equals_uncached(norm, positions):
    model = _model(norm, positions)
    src = _src()
    tgt_in = torch.tensor([[BOS, 4, 5, 6, 7], [BOS, 8, 9, 10, 4], [BOS, 5, 5, 5, 5]])
    with torch.no_grad():
        full = torch.log_softmax(model.logits(model(src, tgt_in)), dim=-1)  # (B, T, V)
        enc = model.encode(src)
        state = model.init_state(enc)
        for t in range(tgt_in.size(1)):
            step, _ = model.decode_step(tgt_in[:, t], state)
            torch.testing.assert_close(step, full[:, t], atol=1e-5, rtol=1e-5)


def test_cached_decoding_with_reordered_rows_equals_uncached():
    """40 steps (the cache's buffers grow twice) with the rows reordered as beam search and
    finished inputs do: every step equals the full forward of the row's own history."""
    model = _model(positions="learned")
    src = _src()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        enc = model.encode(src)
        state = model.init_state(enc, group_size=2)  # rows 2i, 2i+1 belong to input i
        inputs = [0, 0, 1, 1, 2, 2]
        history = [[BOS] for _ in inputs]
        for t in range(40):
            prev = torch.tensor([h[-1] for h in history])
            step, _ = model.decode_step(prev, state)
            full_in = torch.tensor(history)
            full = torch.log_softmax(model.logits(model(src[inputs], full_in)), dim=-1)
            torch.testing.assert_close(step, full[:, -1], atol=1e-5, rtol=1e-5)
            nxt = torch.randint(4, 13, (len(history),), generator=g).tolist()
            history = [h + [tok] for h, tok in zip(history, nxt)]
            if t in (3, 20):  # beams swap and one beam takes over both rows of an input
                index = torch.tensor([1, 0, 2, 2, 5, 4])
            elif t == 30:  # input 1 finishes and leaves the batch
                index = torch.tensor([0, 1, 4, 5])
            else:
                continue
            model.reorder_state(state, index)
            history = [history[i] for i in index.tolist()]
            inputs = [inputs[i] for i in index.tolist()]  # rows of the original batch


def test_cached_attention_equals_uncached_attention():
    model = _model()
    src = _src()
    tgt_in = torch.tensor([[BOS, 4, 5], [BOS, 8, 9], [BOS, 5, 5]])
    with torch.no_grad():
        enc = model.encode(src)
        _, weights = model.decode(tgt_in, enc, need_attention=True)  # (B, T, S)
        state = model.init_state(enc, group_size=2)  # two rows per input, as in a beam
        for t in range(3):
            _, att = model.decode_step(tgt_in[:, t].repeat_interleave(2), state, need_attention=True)
            torch.testing.assert_close(att[0::2], weights[:, t], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(att[1::2], weights[:, t], atol=1e-5, rtol=1e-5)
    assert torch.all(weights[1, :, 3:] == 0)  # no attention on source padding


def test_beam_one_equals_greedy():
    model = _model(seed=3)
    src = _src()
    g = greedy(model, src, max_len_a=1.0, max_len_b=4)
    b = beam_search(model, src, beam_size=1, length_penalty=0.0, max_len_a=1.0, max_len_b=4)
    for gh, bh in zip(g, b):
        assert gh[0].tokens == bh[0].tokens
        assert math.isclose(gh[0].score, bh[0].score, rel_tol=1e-5, abs_tol=1e-5)


def _greedy_is_argmax_of_full_forward(model, src, a, b) -> int:
    """Check every greedy output token, and where it stops (EOS, or the length limit), against
    the argmax of one teacher-forced forward pass; returns how many outputs ended with EOS."""
    hyps = greedy(model, src, max_len_a=a, max_len_b=b)
    ended = 0
    with torch.no_grad():
        for i, h in enumerate(hyps):
            n = int(src[i].ne(PAD).sum())
            tgt_in = torch.tensor([[BOS] + h[0].tokens])
            lp = torch.log_softmax(model.logits(model(src[i:i + 1, :n], tgt_in)), -1)
            lp[..., [PAD, BOS]] = float("-inf")  # never output tokens
            expected = lp[0].argmax(-1).tolist()  # one more prediction than output tokens
            limit = int(a * n + b)  # output tokens, EOS included
            if len(h[0].tokens) + 1 < limit:  # it stopped early: EOS must be the argmax there
                assert expected == h[0].tokens + [EOS]
                ended += 1
            else:
                assert len(h[0].tokens) + 1 == limit and expected[:-1] == h[0].tokens
            assert not {PAD, BOS} & set(h[0].tokens)
    return ended


def test_greedy_equals_argmax_of_full_forward():
    model = _model(seed=4)
    src = _src()
    _greedy_is_argmax_of_full_forward(model, src, 1.0, 4)
    for hyps in beam_search(model, src, beam_size=4, nbest=4, max_len_a=1.0, max_len_b=4):
        assert all(not {PAD, BOS} & set(h.tokens) for h in hyps)


def test_trained_greedy_stops_where_the_full_forward_predicts_eos(tiny_run):
    from encdec.translate import Translator

    tr = Translator.from_run(tiny_run)
    words = ["abc", "hgfedcb", "a", "cafe", "ddd"]
    ids = [tr.assets.src_vocab.encode(tr.assets.src_tokenizer.encode(w)) for w in words]
    src = torch.full((len(ids), max(map(len, ids))), PAD)
    for i, x in enumerate(ids):
        src[i, :len(x)] = torch.tensor(x)
    assert _greedy_is_argmax_of_full_forward(tr.model, src, 1.0, 3) >= 3  # most stop at EOS


def test_max_length_is_a_times_src_plus_b():
    model = _model(seed=5)
    src = _src()
    for hyp in greedy(model, src, max_len_a=0.0, max_len_b=2):
        assert len(hyp[0].tokens) <= 1  # 2 tokens at most, EOS included
    for hyps in beam_search(model, src, beam_size=3, max_len_a=0.5, max_len_b=1, nbest=3):
        for h in hyps:
            assert len(h.tokens) + 1 <= 0.5 * 5 + 1


class ScriptedModel:
    """A fake model whose next-token distribution depends only on the prefix (hand-checkable)."""

    A, B = 4, 5
    V = 6

    def __init__(self, table):
        self.table = table  # prefix tuple -> {token: prob}

    def encode(self, src_tokens):
        B = src_tokens.size(0)
        return EncoderOut(torch.zeros(B, 1, 1), torch.ones(B, 1, dtype=torch.bool))

    def init_state(self, enc, group_size=1):
        rows = enc.memory.size(0) * group_size
        return DecoderState(group_size, enc.memory_mask, layers=[torch.zeros(rows, 0, dtype=torch.long)])

    def decode_step(self, prev, state, need_attention=False):
        if state.step > 0:
            state.layers[0] = torch.cat([state.layers[0], prev[:, None]], dim=1)
        state.step += 1
        out = torch.full((prev.size(0), self.V), 1e-9)
        for row, prefix in enumerate(state.layers[0].tolist()):
            for tok, p in self.table.get(tuple(prefix), {EOS: 1.0}).items():
                out[row, tok] = p
        return out.log(), None

    def reorder_state(self, state, index, group_size=None):
        state.layers[0] = state.layers[0].index_select(0, index)
        state.group_size = group_size or state.group_size
        return state


A, B_ = ScriptedModel.A, ScriptedModel.B
TABLE = {(): {A: 0.6, B_: 0.4}, (A,): {EOS: 0.4, A: 0.3, B_: 0.3}, (B_,): {EOS: 0.9, A: 0.05, B_: 0.05}}


def test_beam_search_on_scripted_model_matches_hand_computed_scores():
    model = ScriptedModel(TABLE)
    src = torch.tensor([[4, 4]])
    # Greedy takes A (0.6) then EOS (0.4): p = 0.24.
    g = greedy(model, src, max_len_a=0, max_len_b=5)[0][0]
    assert g.tokens == [A] and math.isclose(g.score, math.log(0.24), rel_tol=1e-6)
    # Beam 2 keeps B (0.4), whose EOS (0.9) gives p = 0.36 > 0.24; length 2 for both.
    hyps = beam_search(model, src, beam_size=2, nbest=2, length_penalty=1.0, max_len_a=0, max_len_b=5)[0]
    assert [h.tokens for h in hyps] == [[B_], [A]]
    assert math.isclose(hyps[0].score, math.log(0.36) / 2, rel_tol=1e-6)
    assert math.isclose(hyps[1].score, math.log(0.24) / 2, rel_tol=1e-6)


def test_beam_candidates_and_survivors_by_hand():
    from encdec.decoding.beam import candidates, survivors

    # one input, two beams (scores -1, -2), five tokens; EOS is token 2
    ninf = float("-inf")
    scores = torch.tensor([[-1.0, -2.0]])
    log_probs = torch.tensor([[[ninf, ninf, -0.1, -0.5, -3.0],    # beam 0
                               [ninf, ninf, -4.0, -0.2, -0.3]]])  # beam 1
    top, beam, tok, eos = candidates(scores, log_probs, beam_size=2)
    # totals: b0: EOS -1.1, 3: -1.5, 4: -4.0; b1: EOS -6.0, 3: -2.2, 4: -2.3; best four
    torch.testing.assert_close(top, torch.tensor([[-1.1, -1.5, -2.2, -2.3]]))
    assert beam.tolist() == [[0, 0, 1, 1]] and tok.tolist() == [[EOS, 3, 3, 4]]
    assert eos.tolist() == [[True, False, False, False]]
    kept, from_beam, kept_tok = survivors(top, beam, tok, eos, beam_size=2)
    torch.testing.assert_close(kept, torch.tensor([[-1.5, -2.2]]))  # the EOS candidate ends
    assert from_beam.tolist() == [[0, 1]] and kept_tok.tolist() == [[3, 3]]
    # a vocabulary too small for the beam: dead beams fill it
    kept, _, _ = survivors(*candidates(torch.zeros(1, 1), torch.tensor([[[ninf, ninf, -1.0, -2.0]]]), 3), 3)
    assert kept[0, 0] == -2.0 and torch.isinf(kept[0, 1:]).all()


def test_length_penalty_divides_by_length_power():
    table = {(): {A: 0.5, B_: 0.5}, (A,): {A: 0.95, EOS: 0.05}, (B_,): {EOS: 0.3, A: 0.7},
             (A, A): {EOS: 0.95, A: 0.05}, (B_, A): {EOS: 0.2, B_: 0.8}}
    model = ScriptedModel(table)
    src = torch.tensor([[4]])
    short = math.log(0.5 * 0.95 * 0.95)  # "A A" + EOS: 3 tokens
    long_ = math.log(0.5 * 0.7 * 0.8)  # "B A B" + EOS (prob 1): 4 tokens
    for penalty in (0.0, 1.0, 2.0):
        hyps = beam_search(model, src, beam_size=2, nbest=2, length_penalty=penalty,
                           max_len_a=0, max_len_b=6)[0]
        scores = {tuple(h.tokens): h.score for h in hyps}
        assert math.isclose(scores[(A, A)], short / 3 ** penalty, rel_tol=1e-6)
        assert math.isclose(scores[(B_, A, B_)], long_ / 4 ** penalty, rel_tol=1e-6)
        # -0.80 vs -1.27 raw; /3 vs /4: -0.27 vs -0.32; /9 vs /16: -0.088 vs -0.080
        assert hyps[0].tokens == ([B_, A, B_] if penalty == 2.0 else [A, A])


def test_beam_search_batch_matches_one_at_a_time():
    model = _model(seed=6)
    src = _src()
    together = beam_search(model, src, beam_size=4, nbest=2, max_len_a=1.0, max_len_b=3)
    for b in range(src.size(0)):
        alone = beam_search(model, src[b:b + 1, : int(src[b].ne(PAD).sum())], beam_size=4, nbest=2,
                            max_len_a=1.0, max_len_b=3)
        assert [h.tokens for h in alone[0]] == [h.tokens for h in together[b]]


def test_filter_logits_top_k_and_top_p():
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    k = filter_logits(lp, 1.0, 2, 1.0)
    assert torch.isinf(k[0, 2:]).all() and torch.isfinite(k[0, :2]).all()
    p = filter_logits(lp, 1.0, 0, 0.7)  # 0.5 + 0.3 reaches 0.7: keep two
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()


def test_sampling_is_seeded_and_greedy_at_low_temperature():
    model = _model(seed=7)
    src = _src()
    g1 = sample(model, src, generator=torch.Generator().manual_seed(1), nbest=2)
    g2 = sample(model, src, generator=torch.Generator().manual_seed(1), nbest=2)
    assert [[h.tokens for h in x] for x in g1] == [[h.tokens for h in x] for x in g2]
    cold = sample(model, src, temperature=1e-4, max_len_a=1.0, max_len_b=4)
    hot = greedy(model, src, max_len_a=1.0, max_len_b=4)
    assert [x[0].tokens for x in cold] == [x[0].tokens for x in hot]


def test_generate_dispatches_by_config():
    model = _model(seed=8)
    src = _src()
    out = generate(model, src, DecodeConfig(method="beam", beam_size=3, nbest=3))
    assert all(len(x) == 3 for x in out)
    assert all(x[0].score >= x[1].score >= x[2].score for x in out)
