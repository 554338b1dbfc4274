"""CTC decoding: greedy (best path) and the prefix scorer that joint CTC/attention beam search
adds to the decoder's scores (Watanabe et al., 2017, "Hybrid CTC/attention architecture").

The CTC head gives per-frame log-probabilities over the vocabulary plus a blank; encdec uses
the padding id as the blank, since padding is never an output token.

The prefix score psi(h) is the log-probability that the CTC output *begins with* the token
sequence h (all alignments whose collapsed labels start with h); psi(h + </s>) is the
probability that it *is* h. Beam search adds w * (psi(h + c) - psi(h)) to each candidate c's
score, which is why the scorer keeps, per hypothesis, the forward variables over time:
r_n[t] (h emitted by frame t, last frame a label) and r_b[t] (last frame a blank).

Dimensions: B inputs, T frames, V vocabulary, N hypotheses (rows), K candidates per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from encdec.data.vocab import EOS, PAD
from encdec.decoding.greedy import Hypothesis
from encdec.models.base import encode_source

NEG_INF = float("-inf")


def ctc_greedy(log_probs: torch.Tensor, lengths: torch.Tensor, blank: int = PAD) -> list[list[int]]:
    """Best path per input: the most likely label per frame, repeats merged, blanks removed."""
    best = log_probs.argmax(-1)  # (B, T)
    out = []
    for b in range(best.size(0)):
        path = best[b, : int(lengths[b])]
        keep = torch.ones_like(path, dtype=torch.bool)
        keep[1:] = path[1:] != path[:-1]
        out.append([int(t) for t in path[keep] if int(t) != blank])
    return out


def _path_segments(path: list[int], blank: int) -> list[tuple[int, int, int]]:
    """(label, first frame, end frame) of each label the best path emits."""
    segments = []
    for t, label in enumerate(path):
        if label == blank:
            continue
        if t > 0 and path[t - 1] == label:
            segments[-1] = (label, segments[-1][1], t + 1)
        else:
            segments.append((label, t, t + 1))
    return segments


@torch.inference_mode()
def ctc_best_path(model, source, need_attention: bool = False,
                  blank: int = PAD) -> list[list[Hypothesis]]:
    """CTC greedy decoding (the speech NAT: one pass, all positions at once). The score is the
    best path's log-probability. ``attention`` (asked for alignments), (len(tokens) + 1, S): row
    k is token k's posterior over the positions where the best path emits it (zero elsewhere,
    so a repeated token has its own row), the last row the blank's posterior."""
    encoder_out = encode_source(model, source)
    lp = encoder_out.ctc_log_probs  # (B, S, V)
    if lp is None:
        raise ValueError("decode.method=ctc needs a model with a CTC head")
    lengths = encoder_out.memory_mask.sum(dim=1).tolist()
    best_lp, best = lp.max(dim=-1)  # (B, S)
    scores = best_lp.masked_fill(~encoder_out.memory_mask, 0.0).sum(dim=1).tolist()
    best = best.cpu()
    hyps = []
    for b in range(lp.size(0)):
        segments = _path_segments(best[b, : lengths[b]].tolist(), blank)
        attn = None
        if need_attention:
            attn = torch.zeros(len(segments) + 1, lp.size(1))
            for k, (label, start, end) in enumerate(segments):
                attn[k, start:end] = lp[b, start:end, label].exp().float().cpu()
            attn[-1] = lp[b, :, blank].exp().float().cpu()
        hyps.append([Hypothesis([label for label, _, _ in segments], scores[b], attn)])
    return hyps


@dataclass
class CTCState:
    """Forward variables of N hypotheses: ``r`` (N, T, 2) log r_n, r_b per frame; ``psi`` (N,)
    the prefix score; ``last`` (N,) the last label (-1 for the empty prefix); ``rows`` (N,) the
    input each hypothesis belongs to."""
    r: torch.Tensor
    psi: torch.Tensor
    last: torch.Tensor
    rows: torch.Tensor

    def select(self, index: torch.Tensor) -> "CTCState":
        return CTCState(self.r[index], self.psi[index], self.last[index], self.rows[index])


class CTCPrefixScorer:
    """Prefix scores of candidate extensions, batched over hypotheses and candidates."""

    def __init__(self, log_probs: torch.Tensor, lengths: torch.Tensor, blank: int = PAD,
                 eos: int = EOS):
        B, T, V = log_probs.shape
        self.blank, self.eos = blank, eos
        # Past an input's last frame every path must emit blank with probability 1, so the
        # forward variables at frame T equal those at the input's own last frame.
        past_end = torch.arange(T, device=log_probs.device)[None, :] >= lengths[:, None].to(log_probs.device)
        lp = log_probs.float().masked_fill(past_end[..., None], NEG_INF)
        lp[..., blank] = lp[..., blank].masked_fill(past_end, 0.0)
        self.log_probs = lp  # (B, T, V)

    def initial_state(self, rows: torch.Tensor) -> CTCState:
        """The empty prefix for each row's input ``rows`` (N,)."""
        blank_lp = self.log_probs[rows, :, self.blank]  # (N, T)
        r = torch.stack([torch.full_like(blank_lp, NEG_INF), blank_lp.cumsum(1)], dim=-1)
        zeros = torch.zeros(rows.numel(), device=rows.device)
        return CTCState(r, zeros, torch.full_like(rows, -1), rows)

    def score(self, state: CTCState, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """psi of each row's prefix extended by each of its candidates (N, K), and the new
        forward variables (N, K, T, 2). A candidate equal to ``eos`` scores the whole output."""
        lp = self.log_probs[state.rows]  # (N, T, V)
        N, T, _ = lp.shape
        K = candidates.size(1)
        y_c = lp.gather(2, candidates[:, None, :].expand(N, T, K)).transpose(1, 2)  # (N, K, T)
        y_blank = lp[:, :, self.blank][:, None, :].expand(N, K, T)
        r_n_prev, r_b_prev = state.r[..., 0][:, None, :], state.r[..., 1][:, None, :]  # (N, 1, T)
        # phi[t]: the prefix before c is complete by frame t; a repeated label needs a blank
        # between its two emissions.
        repeat = (candidates == state.last[:, None])[..., None]  # (N, K, 1)
        phi = torch.where(repeat, r_b_prev, torch.logaddexp(r_n_prev, r_b_prev))  # (N, K, T)
        r_n = torch.full((N, K, T), NEG_INF, device=lp.device)
        r_b = torch.full((N, K, T), NEG_INF, device=lp.device)
        empty = (state.last < 0)[:, None]  # (N, 1): only the empty prefix can start at frame 0
        r_n[..., 0] = torch.where(empty, y_c[..., 0], torch.full_like(y_c[..., 0], NEG_INF))
        for t in range(1, T):
            r_n[..., t] = torch.logaddexp(r_n[..., t - 1], phi[..., t - 1]) + y_c[..., t]
            r_b[..., t] = torch.logaddexp(r_b[..., t - 1], r_n[..., t - 1]) + y_blank[..., t]
        # psi(h + c): c emitted first at some frame t after the prefix was complete at t - 1.
        first = torch.cat([r_n[..., :1], phi[..., :-1] + y_c[..., 1:]], dim=-1)  # (N, K, T)
        psi = torch.logsumexp(first, dim=-1)
        ended = torch.logaddexp(state.r[:, -1, 0], state.r[:, -1, 1])  # (N,) p(output == prefix)
        psi = torch.where(candidates == self.eos, ended[:, None], psi)
        return psi, torch.stack([r_n, r_b], dim=-1)

    def advance(self, state: CTCState, psi: torch.Tensor, r: torch.Tensor,
                rows: torch.Tensor, cols: torch.Tensor, candidates: torch.Tensor) -> CTCState:
        """The states of the chosen extensions: hypothesis ``rows`` (M,) with its candidate
        column ``cols`` (M,) of ``candidates`` (N, K)."""
        token = candidates[rows, cols]
        return CTCState(r[rows, cols], psi[rows, cols], token, state.rows[rows])


class JointCTC:
    """Beam search's CTC partner: turns the decoder's next-token log-probabilities into joint
    scores (1 - w) * log p_att(c | h) + w * (psi(h + c) - psi(h)), so a hypothesis' total is
    (1 - w) * log p_att(h) + w * log p_ctc-prefix(h), and follows the beams' reordering.

    Prefix scores cost T operations per candidate, so each row scores only ``pre_beam``
    candidates, chosen by (1 - w) * log p_att(c | h) + w * log max_t p_ctc(c | frame t) (the
    second term: whether c is likely anywhere in the input), plus EOS. With ``pre_beam`` at
    least twice the beam and w = 0 this keeps every candidate beam search could pick, so the
    result equals attention-only beam search.
    """

    def __init__(self, ctc_log_probs: torch.Tensor, memory_mask: torch.Tensor, weight: float,
                 pre_beam: int):
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"CTC weight {weight} must be in [0, 1]")
        lengths = memory_mask.sum(dim=1)
        self.prefix = CTCPrefixScorer(ctc_log_probs, lengths)
        self.weight = weight
        self.pre_beam = min(pre_beam, ctc_log_probs.size(-1))
        self.prior = self.prefix.log_probs.max(dim=1).values  # (B, V) best frame per token
        self.state = self.prefix.initial_state(torch.arange(ctc_log_probs.size(0),
                                                            device=ctc_log_probs.device))
        self._pending = None

    def combine(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Joint scores (N, V) of extending each row by each token (-inf outside the
        candidates) from the decoder's (N, V) log-probabilities (-inf: never emit)."""
        w = self.weight
        allowed = log_probs.isfinite()
        att = log_probs.masked_fill(~allowed, 0.0)
        pre = (1.0 - w) * att + (w * self.prior[self.state.rows] if w > 0 else 0.0)
        pre = pre.masked_fill(~allowed, NEG_INF)
        pre[:, self.prefix.eos] = float("inf")  # EOS is always a candidate
        candidates = pre.topk(self.pre_beam, dim=1).indices  # (N, P)
        psi, r = self.prefix.score(self.state, candidates)  # (N, P), (N, P, T, 2)
        # psi - psi(h) is nan where both are -inf (an impossible prefix): impossible, -inf.
        gain = torch.nan_to_num(psi - self.state.psi[:, None], nan=NEG_INF)
        joint = (1.0 - w) * att.gather(1, candidates)
        if w > 0:  # (0 * -inf would be nan)
            joint = joint + w * gain
        joint = joint.masked_fill(~allowed.gather(1, candidates), NEG_INF)
        self._pending = (psi, r, candidates)
        return torch.full_like(log_probs, NEG_INF).scatter(1, candidates, joint)

    def advance(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Keep row ``rows[i]`` extended by ``tokens[i]`` as the new row i."""
        psi, r, candidates = self._pending
        cols = (candidates[rows] == tokens[:, None]).int().argmax(dim=1)
        self.state = self.prefix.advance(self.state, psi, r, rows, cols, candidates)
        self._pending = None
