"""Non-autoregressive decoding: predict lengths, emit all tokens at once, refine (Mask-Predict).

Mask-Predict (Ghazvininejad et al., 2019): the first pass predicts every position from [MASK]
inputs. Each later pass t = 1 .. K-1 re-masks the n = L * (K - t) / K least confident tokens
(linear decay) and predicts those again, seeing the others. With ``length_beam`` l, the l most
likely lengths are decoded in parallel and the output with the highest score wins: the mean
token log-probability plus the length's log-probability. ``length_scale`` multiplies each
predicted length before decoding: below 1 shorter, above 1 longer output (for speech output,
faster or slower speech).

Rows leave the batch as soon as they are final: a row with nothing left to re-mask (exact),
and, with ``early_exit`` (the default), a row whose last pass changed none of its tokens, as
fairseq's iterative refinement does. Later passes then run on the few rows still changing, at
their own width (`benchmarks/nat_passes.py` prints the share of outputs each pass changes).

The model contract used here (``models/nat.py``): ``encode``, ``length_log_probs``,
``lengths_of_classes``, ``project_memory``, ``decode_parallel`` and ``logits``. The encoder
output's cross-attention keys and values are projected once and shared by every pass and every
candidate length of an input.
"""

from __future__ import annotations

import torch

from encdec.data.vocab import BOS, EOS, PAD, UNK
from encdec.decoding.greedy import Hypothesis
from encdec.models.base import EncoderOut


def remask_count(lengths: torch.Tensor, iteration: int, iterations: int) -> torch.Tensor:
    """Tokens to re-mask after pass ``iteration`` (0-based) of ``iterations``: linear decay."""
    return (lengths * (iterations - 1 - iteration)) // iterations


@torch.no_grad()
def mask_predict(model, src_tokens: torch.Tensor, *, iterations: int = 4, length_beam: int = 1,
                 length_scale: float = 1.0, nbest: int = 1,
                 max_output_len: int | torch.Tensor = 1024, need_attention: bool = False,
                 early_exit: bool = True,
                 lengths: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """n-best outputs per input. ``lengths`` (B,): decode exactly these output lengths instead
    of predicting them (one candidate per input; e.g. to measure what a perfect length
    predictor would give, or durations decided elsewhere). ``max_output_len``: the longest
    output, for all inputs or per input (B,)."""
    if iterations < 1 or length_beam < 1:
        raise ValueError("iterations and length_beam must be at least 1")
    encoder_out = model.encode(src_tokens)
    B = src_tokens.size(0)
    length_lp = model.length_log_probs(encoder_out)  # (B, C)
    longest = torch.as_tensor(max_output_len, device=length_lp.device).long().clamp(min=1).expand(B)
    if lengths is not None:
        L = 1
        lengths = torch.minimum(lengths.to(length_lp.device).long().reshape(-1).clamp(min=1),
                                longest)
        top_lp = length_lp.gather(1, model.length_classes(encoder_out, lengths)[:, None])
    else:
        L = min(length_beam, length_lp.size(1))
        top_lp, classes = length_lp.topk(L, dim=-1)  # (B, L), most likely first
        lengths = model.lengths_of_classes(encoder_out, classes).float() * length_scale
        lengths = torch.minimum(lengths.round().long().clamp(min=1), longest[:, None])
        lengths = lengths.reshape(-1)  # (N = B * L,)

    memory = model.project_memory(encoder_out)  # shared by all passes and candidate lengths
    device = lengths.device
    N, T = lengths.numel(), int(lengths.max())
    real = torch.arange(T, device=device)[None, :] < lengths[:, None]  # (N, T)
    tokens = torch.full((N, T), PAD, dtype=torch.long, device=device)
    tokens[real] = UNK  # a placeholder: unobserved positions read the [MASK] vector
    scores = torch.zeros(N, T, device=device)
    observed = torch.zeros_like(real)
    attention = None
    active = torch.arange(N, device=device)  # rows still being refined
    for it in range(iterations):
        if active.numel() == N:  # every row: the memory is shared by the rows of an input
            enc, mem, t = encoder_out, memory, T
        else:  # a subset: each row gets its input's memory
            inputs = active // L
            enc = EncoderOut(encoder_out.memory.index_select(0, inputs),
                             encoder_out.memory_mask.index_select(0, inputs))
            mem = None if memory is None else [m.select(inputs) for m in memory]
            t = int(lengths[active].max())
        tok, obs, rl = tokens[active, :t], observed[active, :t], real[active, :t]
        hidden, weights = model.decode_parallel(tok, obs, enc, memory=mem,
                                                need_attention=need_attention)
        update = rl & ~obs  # only these positions are predicted (again) in this pass
        log_probs = torch.log_softmax(model.logits(hidden[update]).float(), dim=-1)  # (M, V)
        log_probs[:, [PAD, BOS, EOS]] = float("-inf")  # output is tokens only; length decides
        best_lp, best = log_probs.max(dim=-1)
        new = tok.masked_scatter(update, best)
        changed = (new != tok).any(dim=1)
        sc = scores[active, :t].masked_scatter(update, best_lp)
        tokens[active, :t] = new
        scores[active, :t] = sc
        if weights is not None:
            if attention is None:
                attention = weights.new_zeros(N, T, weights.size(-1))
            attention[active, :t] = weights
        if it == iterations - 1:
            break
        n_mask = remask_count(lengths[active], it, iterations)  # (A,)
        order = sc.masked_fill(~rl, float("inf")).argsort(dim=1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(t, device=device).expand_as(order))
        observed[active, :t] = rl & (rank >= n_mask[:, None])  # the n_mask least confident
        # A row with nothing left to re-mask is final. With early exit, so is a row this pass
        # left unchanged (the first pass always changes: it replaces the placeholders).
        keep = n_mask > 0
        if early_exit and it > 0:
            keep &= changed
        active = active[keep]
        if active.numel() == 0:
            break

    # Candidates rank by log p(length) + the mean token log-probability: the mean alone
    # favours lengths the length predictor thinks unlikely (measured on G2P dev: worse WER
    # with a length beam of 3 than with 1).
    score = (scores * real).sum(1) / lengths + top_lp.reshape(-1).float()  # (N,)
    # Python numbers from here: no per-row tensor reads.
    score_of, lengths_of, token_rows = score.tolist(), lengths.tolist(), tokens.tolist()
    results: list[list[Hypothesis]] = []
    for b in range(B):
        cands = sorted(range(b * L, (b + 1) * L), key=lambda r: -score_of[r])[:nbest]
        hyps = []
        for r in cands:
            n = lengths_of[r]
            attn = None
            if attention is not None:
                # One row per token, plus a zero row where autoregressive output has </s>.
                attn = torch.cat([attention[r, :n], attention.new_zeros(1, attention.size(-1))])
            hyps.append(Hypothesis(token_rows[r][:n], score_of[r], attn))
        results.append(hyps)
    return results
