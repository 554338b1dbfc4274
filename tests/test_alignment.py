"""Monotonic alignment (forward-sum, MAS, the beta-binomial prior), the length regulator and
the Griffin-Lim vocoder, checked against brute force and against the front end they invert."""

import itertools
import math

import pytest
import torch

from encdec.audio.features import LogMel
from encdec.audio.vocoder import mel_to_magnitude, spectral_convergence, vocode
from encdec.nn.alignment import (binarization_loss, durations, forward_sum_loss,
                                 length_regulate, monotonic_alignment_search)


def _paths(T, N):
    """Every monotonic path of T frames over N tokens, as token index per frame."""
    for steps in itertools.combinations(range(1, T), N - 1):
        j, path = 0, []
        for t in range(T):
            if t in steps:
                j += 1
            path.append(j)
        yield path


def _batch(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    B, T, N = len(shapes), max(s[0] for s in shapes), max(s[1] for s in shapes)
    scores = torch.randn(B, T, N, generator=g, dtype=torch.float64) * 2
    lp = scores.log_softmax(dim=-1)
    frames = torch.tensor([s[0] for s in shapes])
    tokens = torch.tensor([s[1] for s in shapes])
    return lp, tokens, frames


SHAPES = [(7, 3), (5, 5), (6, 1), (4, 2), (7, 4)]


@pytest.mark.parametrize("seed", range(3))
def test_forward_sum_and_mas_equal_brute_force_over_all_monotonic_paths(seed):
    lp, tokens, frames = _batch(seed, SHAPES)
    loss = forward_sum_loss(lp, tokens, frames, blank=None)
    hard = monotonic_alignment_search(lp, tokens, frames)
    want_loss = 0.0
    for b, (T, N) in enumerate(SHAPES):
        sums = {tuple(p): sum(float(lp[b, t, j]) for t, j in enumerate(p)) for p in _paths(T, N)}
        want_loss += -math.log(sum(math.exp(v) for v in sums.values())) / T
        best = max(sums, key=sums.get)
        got = hard[b, :T, :N].argmax(dim=1).tolist()
        assert got == list(best), (b, got, best)
        assert hard[b].sum() == T and hard[b, T:].sum() == 0 and hard[b, :, N:].sum() == 0
    assert float(loss) == pytest.approx(want_loss / len(SHAPES), rel=1e-9)
    assert durations(hard).sum(dim=1).tolist() == [T for T, _ in SHAPES]
    assert (durations(hard)[0, :3] >= 1).all()


def _ctc_paths(T, N):
    """Every frame labelling over {0: blank, 1..N} that reads 1..N once repeats are merged and
    blanks dropped (CTC's rule; the targets never repeat)."""
    for labels in itertools.product(range(N + 1), repeat=T):
        merged = [c for k, c in enumerate(labels) if k == 0 or c != labels[k - 1]]
        if [c for c in merged if c] == list(range(1, N + 1)):
            yield labels


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("blank", [-1.0, 0.5])
def test_forward_sum_with_a_blank_equals_brute_force_over_all_ctc_paths(seed, blank):
    shapes = [(5, 2), (4, 3), (6, 1), (3, 3), (5, 4)]
    lp, tokens, frames = _batch(seed, shapes)
    loss = forward_sum_loss(lp, tokens, frames, blank=blank)
    want = 0.0
    for b, (T, N) in enumerate(shapes):
        classes = torch.cat([torch.full((T, 1), blank, dtype=lp.dtype), lp[b, :T, :N]], dim=-1)
        classes = classes.log_softmax(dim=-1)
        total = sum(math.exp(sum(float(classes[t, c]) for t, c in enumerate(labels)))
                    for labels in _ctc_paths(T, N))
        want += -math.log(total) / T
    assert float(loss) == pytest.approx(want / len(shapes), rel=1e-9)


def test_forward_sum_gradient_and_rows_without_a_path():
    lp, tokens, frames = _batch(5, [(6, 3), (4, 2)])
    scores = lp.clone().requires_grad_(True)
    for blank in (None, -1.0):
        torch.autograd.gradcheck(
            lambda s: forward_sum_loss(s.log_softmax(-1), tokens, frames, blank=blank), (scores,))
    # fewer frames than tokens: no monotonic path; no loss, no alignment, no NaN
    for blank in (None, -1.0):
        short = forward_sum_loss(lp, torch.tensor([3, 2]), torch.tensor([2, 4]), blank=blank)
        assert torch.isfinite(short)
    assert monotonic_alignment_search(lp, torch.tensor([3, 2]), torch.tensor([2, 4]))[0].sum() == 0
    hard = monotonic_alignment_search(lp, tokens, frames)
    assert binarization_loss(hard, lp) == pytest.approx(
        -float((hard * lp.nan_to_num(neginf=0)).sum() / hard.sum()))


def test_length_regulator_repeats_tokens_by_their_durations():
    x = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    d = torch.tensor([[2, 0, 1, 3], [1, 1, 0, 0]])
    out, lengths = length_regulate(x, d)
    assert lengths.tolist() == [6, 2] and out.shape == (2, 6, 3)
    want0 = torch.stack([x[0, 0], x[0, 0], x[0, 2], x[0, 3], x[0, 3], x[0, 3]])
    assert torch.equal(out[0], want0)
    assert torch.equal(out[1, :2], x[1, :2]) and out[1, 2:].abs().sum() == 0
    assert length_regulate(x, d, max_frames=4)[0].shape == (2, 4, 3)


def _voice_like(seconds=1.0, sr=16000):
    t = torch.arange(int(seconds * sr)) / sr
    phase = 2 * math.pi * torch.cumsum(120 + 60 * t, 0) / sr
    x = sum((0.5 / k) * torch.sin(k * phase) for k in range(1, 20))
    x = x * (0.5 + 0.5 * torch.sin(2 * math.pi * 3 * t))
    return x / x.abs().max() * 0.5


def test_griffin_lim_inverts_the_front_end_and_momentum_converges_faster():
    front = LogMel()
    feats, _ = front(_voice_like()[None] * 32768)
    mag = mel_to_magnitude(feats)
    results = {}
    for name, iterations, momentum in [("random phase", 0, 0.99), ("plain", 32, 0.0),
                                       ("fast", 32, 0.99)]:
        wave = vocode(feats, iterations=iterations, momentum=momentum)
        again, _ = front(wave * 32768)
        T = min(again.size(1), feats.size(1))
        results[name] = (float((again[:, :T] - feats[:, :T]).abs().mean()),
                         spectral_convergence(mag, wave * 32768))
        assert wave.abs().max() <= 1.0 and wave.size(1) == (feats.size(1) - 1) * 160 + 400
    assert results["fast"][0] < 0.5 < results["random phase"][0]  # log-mel error, nats
    assert results["fast"][1] < results["plain"][1] < results["random phase"][1]


def test_beta_binomial_prior_is_a_diagonal_distribution_over_real_tokens():
    from encdec.nn.alignment import beta_binomial_prior

    log_p = beta_binomial_prior(torch.tensor([4, 1, 3]), torch.tensor([10, 3, 2]), 10, 4)
    p = log_p.double().exp()
    # each real frame: a distribution over the row's real tokens (padded tokens: 0)
    assert torch.allclose(p[0].sum(-1), torch.ones(10, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(p[1, :3].sum(-1), torch.ones(3, dtype=torch.float64), atol=1e-5)
    assert (p[1, :3, 1:] == 0).all() and (p[2, :2, 3:] == 0).all()
    assert (log_p[2, 2:] == 0).all()  # frames past the row's end are left alone
    # BetaBinomial(n=3, a=1, b=10) at k=0 by hand: B(1, 13) / B(1, 10) = 10 / 13
    assert p[0, 0, 0].item() == pytest.approx(10 / 13, rel=1e-5)
    # the most likely token moves from the first to the last along the frames
    peaks = p[0].argmax(-1).tolist()
    assert peaks[0] == 0 and peaks[-1] == 3 and peaks == sorted(peaks)
