"""CTC decoding: greedy best path, and prefix scores checked against brute-force enumeration
of every alignment on a tiny vocabulary."""

import itertools
import math

import pytest
import torch

from encdec.data.vocab import EOS, PAD
from encdec.decoding.ctc import CTCPrefixScorer, ctc_greedy

LABELS = [4, 5, 6]  # the blank is PAD (0); other specials get no probability


def _log_probs(B, T, V=7, seed=0):
    torch.manual_seed(seed)
    logits = torch.randn(B, T, V) * 2
    logits[..., [1, 2, 3]] = float("-inf")
    return torch.log_softmax(logits, -1)


def _collapse(path):
    out = []
    for i, s in enumerate(path):
        if s != PAD and (i == 0 or s != path[i - 1]):
            out.append(s)
    return tuple(out)


def _brute_force(log_probs: torch.Tensor, T: int) -> dict:
    """p(output) for every output, summing every alignment of T frames."""
    probs = {}
    for path in itertools.product([PAD] + LABELS, repeat=T):
        p = math.exp(sum(float(log_probs[t, s]) for t, s in enumerate(path)))
        key = _collapse(path)
        probs[key] = probs.get(key, 0.0) + p
    return probs


def _prefix(probs, h):
    return sum(p for o, p in probs.items() if o[: len(h)] == tuple(h))


def test_prefix_scores_equal_brute_force_over_all_alignments():
    T_max, lengths = 6, [6, 4]
    log_probs = _log_probs(2, T_max)
    scorer = CTCPrefixScorer(log_probs, torch.tensor(lengths))
    candidates = torch.tensor([LABELS + [EOS]] * 2)  # (N=2, K=4)
    for b, T in enumerate(lengths):
        probs = _brute_force(log_probs[b], T)
        assert sum(probs.values()) == pytest.approx(1.0)
        # Grow the prefixes (), (5,), (5, 5), (5, 5, 4) and check every extension and </s>.
        state = scorer.initial_state(torch.tensor([b]))
        prefix = []
        for nxt in (5, 5, 4):
            psi, r = scorer.score(state, candidates[:1])
            for k, c in enumerate(LABELS):
                assert math.exp(psi[0, k]) == pytest.approx(_prefix(probs, prefix + [c]), rel=1e-4)
            assert math.exp(psi[0, 3]) == pytest.approx(probs.get(tuple(prefix), 0.0), rel=1e-4,
                                                        abs=1e-12)
            col = LABELS.index(nxt)
            state = scorer.advance(state, psi, r, torch.tensor([0]), torch.tensor([col]),
                                   candidates[:1])
            prefix.append(nxt)
            assert math.exp(state.psi[0]) == pytest.approx(_prefix(probs, prefix), rel=1e-4)


def test_rows_of_several_inputs_score_as_alone():
    log_probs = _log_probs(3, 8, seed=1)
    lengths = torch.tensor([8, 5, 3])
    scorer = CTCPrefixScorer(log_probs, lengths)
    rows = torch.tensor([2, 0, 1, 0])
    state = scorer.initial_state(rows)
    cands = torch.tensor([[4, 5, EOS], [6, 4, EOS], [5, 6, EOS], [4, 4, EOS]])
    psi, r = scorer.score(state, cands)
    state = scorer.advance(state, psi, r, torch.arange(4), torch.tensor([0, 1, 0, 1]), cands)
    psi2, _ = scorer.score(state, cands)
    for n, b in enumerate(rows.tolist()):
        alone = CTCPrefixScorer(log_probs[b:b + 1, : int(lengths[b])], lengths[b:b + 1])
        s = alone.initial_state(torch.tensor([0]))
        p, rr = alone.score(s, cands[n:n + 1])
        torch.testing.assert_close(p[0], psi[n], atol=1e-5, rtol=1e-5)
        s = alone.advance(s, p, rr, torch.tensor([0]), torch.tensor([[0, 1, 0, 1][n]]), cands[n:n + 1])
        p2, _ = alone.score(s, cands[n:n + 1])
        torch.testing.assert_close(p2[0], psi2[n], atol=1e-5, rtol=1e-5)


def test_greedy_merges_repeats_and_drops_blanks():
    V = 7
    path = torch.tensor([[4, 4, PAD, 4, 5, 5, PAD, PAD, 6, 6], [5, PAD, 5, 5, 6, 4, 4, 4, 4, 4]])
    log_probs = torch.full((2, 10, V), -10.0).scatter(2, path[..., None], 0.0)
    assert ctc_greedy(log_probs, torch.tensor([10, 4])) == [[4, 4, 5, 6], [5, 5]]
