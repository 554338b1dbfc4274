"""Batched beam search with length penalty and n-best lists.

Per step, each input's ``beam_size`` rows are extended by every token; of the best
``2 * beam_size`` candidates, those ending in EOS and ranked within the first ``beam_size``
are finished (score normalized by length ** length_penalty), and the best ``beam_size``
others stay alive. An input is done when it has ``beam_size`` finished hypotheses; done inputs
leave the batch so the remaining ones decode faster.
"""

from __future__ import annotations

import torch

from encdec.data.vocab import BOS, EOS
from encdec.decoding.greedy import Hypothesis, max_lengths, never_emit


@torch.inference_mode()
def beam_search(model, src_tokens: torch.Tensor, beam_size: int = 5, nbest: int = 1,
                length_penalty: float = 1.0, max_len_a: float = 1.5, max_len_b: int = 10,
                need_attention: bool = False) -> list[list[Hypothesis]]:
    K = beam_size
    device = src_tokens.device
    encoder_out = model.encode(src_tokens)
    B = src_tokens.size(0)
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

        cand = (scores[:, :, None] + log_probs.view(Ba, width, V)).view(Ba, width * V)
        top_scores, top_ids = cand.topk(min(2 * K, width * V), dim=1)  # (Ba, 2K)
        src_beam = top_ids // V
        top_tok = top_ids % V
        is_eos = top_tok.eq(EOS) & top_scores.isfinite()

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

        # The best K non-EOS candidates continue.
        live_scores = top_scores.masked_fill(is_eos, float("-inf"))
        scores, pos = live_scores.topk(min(K, live_scores.size(1)), dim=1)  # (Ba, K)
        if scores.size(1) < K:  # tiny vocabularies: pad with dead beams
            fill = K - scores.size(1)
            scores = torch.cat([scores, scores.new_full((Ba, fill), float("-inf"))], 1)
            pos = torch.cat([pos, pos[:, :1].expand(Ba, fill)], 1)
        next_beam = src_beam.gather(1, pos)
        next_tok = top_tok.gather(1, pos)
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
        width = K
        prev = next_tok.view(-1)
        t += 1

    results = []
    for hyps in finished:
        hyps.sort(key=lambda h: -h.score)
        results.append(hyps[:nbest])
    return results
