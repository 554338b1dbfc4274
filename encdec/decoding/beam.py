"""Batched beam search with length penalty and n-best lists.

Per step, each input's ``beam_size`` rows are extended by every token; of the best
``2 * beam_size`` candidates, those ending in EOS and ranked within the first ``beam_size``
are finished (score normalized by length ** length_penalty), and the best ``beam_size``
others stay alive. An input is done when it has ``beam_size`` finished hypotheses; done inputs
leave the batch so the remaining ones decode faster.

With ``ctc_weight`` (a model whose encoder has a CTC head), the candidates' scores are joint
CTC/attention scores (``JointCTC``); the selection below does not change.
"""

from __future__ import annotations

import torch

from encdec.data.vocab import BOS, EOS
from encdec.decoding.ctc import JointCTC
from encdec.decoding.greedy import Hypothesis, max_lengths, never_emit
from encdec.models.base import encode_source


@torch.inference_mode()
def beam_search(model, source, beam_size: int = 5, nbest: int = 1,
                length_penalty: float = 1.0, max_len_a: float = 1.5, max_len_b: int = 10,
                need_attention: bool = False, ctc_weight: float | None = None,
                ctc_pre_beam: int = 0) -> list[list[Hypothesis]]:
    """``source``: the model's inputs (``encode_source``). ``ctc_weight`` (None: attention
    only) joins the CTC prefix scores of ``EncoderOut.ctc_log_probs``; each row then scores
    ``ctc_pre_beam`` candidates (0: 2 * beam_size + 30)."""
    K = beam_size
    encoder_out = encode_source(model, source)
    device = encoder_out.memory.device
    B = encoder_out.memory.size(0)
    ctc = None
    if ctc_weight is not None:
        if encoder_out.ctc_log_probs is None:
            raise ValueError("joint CTC/attention decoding needs a model with a CTC head")
        ctc = JointCTC(encoder_out.ctc_log_probs, encoder_out.memory_mask, ctc_weight,
                       ctc_pre_beam or 2 * K + 30)
    limit = max_lengths(encoder_out.memory_mask, max_len_a, max_len_b).to(device)  # (B,)
    # The first step decodes one row per input (all beams would be the same BOS row); the
    # state widens to K rows per input when the first K tokens are chosen.
    state = model.init_state(encoder_out, 1)
    width = 1
    alive = torch.arange(B, device=device)  # original index of each input still searching
    scores = torch.zeros((B, 1), device=device)
    tokens = torch.empty((B, 0), dtype=torch.long, device=device)  # (rows, t)
    attn_hist = None  # (rows, t, S)
    prev = torch.full((B,), BOS, dtype=torch.long, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(B)]
    n_finished = torch.zeros(B, dtype=torch.long, device=device)
    t = 0
    while alive.numel():
        Ba = alive.numel()
        log_probs, weights = model.decode_step(prev, state, need_attention)  # (Ba*width, V)
        log_probs = never_emit(log_probs)
        if ctc is not None:
            log_probs = ctc.combine(log_probs)
        V = log_probs.size(-1)
        at_limit = limit[alive] <= t + 1  # (Ba,)
        if bool(at_limit.any()):
            forced = torch.full_like(log_probs, float("-inf"))
            forced[:, EOS] = log_probs[:, EOS]
            rows = at_limit.repeat_interleave(width)[:, None]
            log_probs = torch.where(rows, forced, log_probs)
        if need_attention:
            step_attn = weights[:, None]  # (rows, 1, S)
            attn_hist = step_attn if attn_hist is None else torch.cat([attn_hist, step_attn], 1)

        top_scores, src_beam, top_tok, is_eos = candidates(scores, log_probs.view(Ba, width, V), K)

        # Finish EOS candidates that rank within the first K (small, sparse: a Python loop).
        first = is_eos[:, :K]
        if bool(first.any()):
            norm = (t + 1) ** length_penalty
            for b, j in first.nonzero().tolist():
                out_b = int(alive[b])
                if len(finished[out_b]) >= K:
                    continue
                row = b * width + int(src_beam[b, j])
                raw = float(top_scores[b, j])
                att = attn_hist[row].float().cpu() if attn_hist is not None else None
                finished[out_b].append(Hypothesis(tokens[row].tolist(), raw / norm, att))
                n_finished[out_b] += 1

        scores, next_beam, next_tok = survivors(top_scores, src_beam, top_tok, is_eos, K)
        rows = (torch.arange(Ba, device=device)[:, None] * width + next_beam).view(-1)  # (Ba*K,)

        done = (n_finished[alive] >= K) | ~scores.isfinite().any(dim=1)
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            alive = alive[keep]
            scores = scores[keep]
            next_tok = next_tok[keep]
            rows = rows.view(Ba, K)[keep].view(-1)
        if alive.numel() == 0:
            break
        tokens = torch.cat([tokens.index_select(0, rows), next_tok.view(-1, 1)], dim=1)
        if attn_hist is not None:
            attn_hist = attn_hist.index_select(0, rows)
        state = model.reorder_state(state, rows, K)
        if ctc is not None:
            ctc.advance(rows, next_tok.view(-1))
        width = K
        prev = next_tok.view(-1)
        t += 1

    results = []
    for hyps in finished:
        hyps.sort(key=lambda h: -h.score)
        results.append(hyps[:nbest])
    return results


def candidates(scores: torch.Tensor, log_probs: torch.Tensor, beam_size: int):
    """The best ``2 * beam_size`` extensions of each input's beams: scores (B, W) of the W
    beams so far, log_probs (B, W, V) of their next tokens. Returns their scores (B, C), the
    beam each extends (B, C), its token (B, C) and whether that is a finite-scored EOS (B, C),
    best first (C = min(2 * beam_size, W * V): twice the beam, so that K continue even if
    up to K of them end)."""
    B, W, V = log_probs.shape
    cand = (scores[:, :, None] + log_probs).view(B, W * V)
    top_scores, top_ids = cand.topk(min(2 * beam_size, W * V), dim=1)  # (B, C)
    top_tok = top_ids % V
    return top_scores, top_ids // V, top_tok, top_tok.eq(EOS) & top_scores.isfinite()


def survivors(top_scores, src_beam, top_tok, is_eos, beam_size: int):
    """The best ``beam_size`` candidates that do not end (``candidates``'s outputs, (B, C)):
    their scores, source beams and tokens, (B, K) each; a vocabulary too small to fill the
    beam is padded with dead beams (score -inf)."""
    K, B = beam_size, top_scores.size(0)
    live_scores = top_scores.masked_fill(is_eos, float("-inf"))
    scores, pos = live_scores.topk(min(K, live_scores.size(1)), dim=1)  # (B, K)
    if scores.size(1) < K:
        fill = K - scores.size(1)
        scores = torch.cat([scores, scores.new_full((B, fill), float("-inf"))], 1)
        pos = torch.cat([pos, pos[:, :1].expand(B, fill)], 1)
    return scores, src_beam.gather(1, pos), top_tok.gather(1, pos)
