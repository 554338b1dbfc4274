"""Step-by-step decoding with one row per output: greedy (argmax) and sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from encdec.data.vocab import BOS, EOS, PAD
from encdec.models.base import encode_source


@dataclass
class Hypothesis:
    tokens: list[int]  # output ids, without EOS
    score: float  # sum of log-probabilities, EOS included (normalized by length in beam search)
    attention: torch.Tensor | None = None  # (len(tokens) + 1, S) cross-attention, when asked


def never_emit(log_probs: torch.Tensor) -> torch.Tensor:
    """Log-probabilities with <pad> and <s> ruled out: they are never output tokens (and
    would vanish from the detokenized text while still counting in the score)."""
    return log_probs.index_fill(1, torch.tensor([PAD, BOS], device=log_probs.device),
                                float("-inf"))


def max_lengths(memory_mask: torch.Tensor, a: float, b: int) -> torch.Tensor:
    """Per input, the most output tokens (EOS included) allowed: a * len(src) + b, at least 1."""
    src_lens = memory_mask.sum(dim=1).float()
    return (a * src_lens + b).floor().long().clamp(min=1)


@torch.inference_mode()
def _rowwise(model, source, choose, max_len_a, max_len_b, need_attention):
    encoder_out = encode_source(model, source)
    B = encoder_out.memory.size(0)
    limit = max_lengths(encoder_out.memory_mask, max_len_a, max_len_b)  # (B,)
    steps = int(limit.max())
    state = model.init_state(encoder_out, 1)
    out = torch.full((B, steps), EOS, dtype=torch.long)
    scores = torch.zeros(B)
    lengths = torch.full((B,), steps, dtype=torch.long)
    attn = [[] for _ in range(B)] if need_attention else None
    alive = torch.arange(B)  # original index of each row still decoding
    prev = torch.full((B,), BOS, dtype=torch.long, device=encoder_out.memory.device)
    for t in range(steps):
        log_probs, weights = model.decode_step(prev, state, need_attention)  # (N, V)
        log_probs = never_emit(log_probs)
        token = choose(log_probs)
        # Inputs at their length limit end here, as if EOS had been chosen.
        at_limit = (limit[alive] <= t + 1).to(token.device)
        token = torch.where(at_limit, torch.full_like(token, EOS), token)
        token_cpu = token.cpu()
        scores[alive] += log_probs.gather(1, token[:, None]).squeeze(1).float().cpu()
        out[alive, t] = token_cpu
        if attn is not None:
            for row, b in enumerate(alive.tolist()):
                attn[b].append(weights[row].float().cpu())
        finished = token_cpu == EOS
        if bool(finished.any()):
            lengths[alive[finished]] = t
            keep = (~finished).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            alive = alive[keep]
            keep_dev = keep.to(token.device)
            state = model.reorder_state(state, keep_dev)
            token = token.index_select(0, keep_dev)
        prev = token
    hyps = []
    for b in range(B):
        n = int(lengths[b])
        a = torch.stack(attn[b]) if attn is not None else None
        hyps.append(Hypothesis(out[b, :n].tolist(), float(scores[b]), a))
    return hyps


def greedy(model, source, max_len_a: float = 1.5, max_len_b: int = 10,
           need_attention: bool = False) -> list[list[Hypothesis]]:
    """``source``: the model's inputs, a (B, S) token tensor or a dict (``encode_source``)."""
    hyps = _rowwise(model, source, lambda lp: lp.argmax(dim=-1), max_len_a, max_len_b,
                    need_attention)
    return [[h] for h in hyps]


def filter_logits(log_probs: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """Temperature, then keep the top-k tokens, then the smallest set with mass >= top_p."""
    logits = log_probs / temperature
    if top_k > 0 and top_k < logits.size(-1):
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first is always kept).
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(model, source, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, nbest: int = 1, max_len_a: float = 1.5, max_len_b: int = 10,
           need_attention: bool = False, generator: torch.Generator | None = None):
    """``nbest`` independent samples per input, each scored by the model's log-probability."""

    def choose(log_probs):
        probs = filter_logits(log_probs, temperature, top_k, top_p).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    if isinstance(source, dict):
        src = {k: v.repeat_interleave(nbest, dim=0) for k, v in source.items()}
        B = next(iter(source.values())).size(0)
    else:
        src, B = source.repeat_interleave(nbest, dim=0), source.size(0)
    hyps = _rowwise(model, src, choose, max_len_a, max_len_b, need_attention)
    grouped = [hyps[i * nbest:(i + 1) * nbest] for i in range(B)]
    return [sorted(g, key=lambda h: -h.score) for g in grouped]
