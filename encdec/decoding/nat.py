"""Non-autoregressive decoding: predict lengths, emit all tokens at once, refine (Mask-Predict).

Mask-Predict (Ghazvininejad et al., 2019): the first pass predicts every position from [MASK]
inputs. Each later pass t = 1 .. K-1 re-masks the n = L * (K - t) / K least confident tokens
(linear decay) and predicts those again, seeing the others. With ``length_beam`` l, the l most
likely lengths are decoded in parallel and the output with the highest score wins: the mean
token log-probability plus the length's log-probability. ``length_scale`` multiplies each
predicted length before decoding: below 1 shorter, above 1 longer output (for speech output,
faster or slower speech).

The model contract used here (``models/nat.py``): ``encode``, ``length_log_probs``,
``lengths_of_classes``, ``project_memory``, ``decode_parallel`` and ``logits``. The encoder
output's cross-attention keys and values are projected once and shared by every pass and every
candidate length of an input.
"""

from __future__ import annotations

import torch

from encdec.data.vocab import BOS, EOS, PAD, UNK
from encdec.decoding.greedy import Hypothesis


def remask_count(lengths: torch.Tensor, iteration: int, iterations: int) -> torch.Tensor:
    """Tokens to re-mask after pass ``iteration`` (0-based) of ``iterations``: linear decay."""
    return (lengths * (iterations - 1 - iteration)) // iterations


@torch.no_grad()
def mask_predict(model, src_tokens: torch.Tensor, *, iterations: int = 4, length_beam: int = 1,
                 length_scale: float = 1.0, nbest: int = 1, max_len: int = 1024,
                 need_attention: bool = False) -> list[list[Hypothesis]]:
    if iterations < 1 or length_beam < 1:
        raise ValueError("iterations and length_beam must be at least 1")
    encoder_out = model.encode(src_tokens)
    B = src_tokens.size(0)
    length_lp = model.length_log_probs(encoder_out)  # (B, C)
    L = min(length_beam, length_lp.size(1))
    top_lp, classes = length_lp.topk(L, dim=-1)  # (B, L), most likely first
    lengths = model.lengths_of_classes(encoder_out, classes).float() * length_scale
    lengths = lengths.round().long().clamp(1, max_len).reshape(-1)  # (N = B * L,)

    memory = model.project_memory(encoder_out)  # shared by all passes and candidate lengths
    N, T = lengths.numel(), int(lengths.max())
    real = torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]  # (N, T)
    tokens = torch.full((N, T), PAD, dtype=torch.long, device=lengths.device)
    tokens[real] = UNK  # a placeholder: unobserved positions read the [MASK] vector
    scores = torch.zeros(N, T, device=lengths.device)
    observed = torch.zeros_like(real)
    attention = None
    for it in range(iterations):
        hidden, weights = model.decode_parallel(tokens, observed, encoder_out, memory=memory,
                                                need_attention=need_attention and it == iterations - 1)
        update = real & ~observed  # only these positions are predicted (again) in this pass
        log_probs = torch.log_softmax(model.logits(hidden[update]).float(), dim=-1)  # (M, V)
        log_probs[:, [PAD, BOS, EOS]] = float("-inf")  # output is tokens only; length decides
        best_lp, best = log_probs.max(dim=-1)
        tokens = tokens.masked_scatter(update, best)
        scores = scores.masked_scatter(update, best_lp)
        if weights is not None:
            attention = weights
        if it == iterations - 1:
            break
        n_mask = remask_count(lengths, it, iterations)  # (N,)
        order = scores.masked_fill(~real, float("inf")).argsort(dim=1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(T, device=order.device).expand(N, T))
        observed = real & (rank >= n_mask[:, None])  # the n_mask least confident are masked

    # Candidates rank by log p(length) + the mean token log-probability: the mean alone
    # favours lengths the length predictor thinks unlikely (measured on G2P dev: worse WER
    # with a length beam of 3 than with 1).
    score = (scores * real).sum(1) / lengths + top_lp.reshape(-1).float()  # (N,)
    results: list[list[Hypothesis]] = []
    for b in range(B):
        cands = sorted(range(b * L, (b + 1) * L), key=lambda r: -float(score[r]))[:nbest]
        hyps = []
        for r in cands:
            n = int(lengths[r])
            attn = None
            if attention is not None:
                # One row per token, plus a zero row where autoregressive output has </s>.
                attn = torch.cat([attention[r, :n], attention.new_zeros(1, attention.size(-1))])
            hyps.append(Hypothesis(tokens[r, :n].tolist(), float(score[r]), attn))
        results.append(hyps)
    return results
