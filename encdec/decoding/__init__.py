"""Search over the model contract of ``encdec.models.base``: greedy, beam and sampling; and
Mask-Predict for non-autoregressive models (``method: nat``)."""

from __future__ import annotations

import torch

from encdec.config import DecodeConfig
from encdec.decoding.beam import beam_search
from encdec.data.vocab import PAD
from encdec.decoding.greedy import Hypothesis, greedy, max_lengths, sample
from encdec.decoding.nat import mask_predict


def generate(model, src_tokens: torch.Tensor, cfg: DecodeConfig, need_attention: bool = False,
             generator: torch.Generator | None = None) -> list[list[Hypothesis]]:
    """Hypotheses per input (best first) with the method and settings of ``cfg``."""
    if cfg.method == "nat":
        # Each input's own length bound, a * len(src) + b, not the padded batch width's.
        longest = max_lengths(src_tokens.ne(PAD), cfg.max_len_a, cfg.max_len_b)  # (B,)
        return mask_predict(model, src_tokens, iterations=cfg.iterations,
                            length_beam=cfg.length_beam, length_scale=cfg.length_scale,
                            nbest=cfg.nbest, max_len=longest,
                            need_attention=need_attention, early_exit=cfg.early_exit)
    limits = dict(max_len_a=cfg.max_len_a, max_len_b=cfg.max_len_b, need_attention=need_attention)
    if cfg.method == "greedy" or (cfg.method == "beam" and cfg.beam_size == 1 and cfg.nbest == 1):
        return greedy(model, src_tokens, **limits)
    if cfg.method == "beam":
        return beam_search(model, src_tokens, beam_size=cfg.beam_size, nbest=cfg.nbest,
                           length_penalty=cfg.length_penalty, **limits)
    return sample(model, src_tokens, temperature=cfg.temperature, top_k=cfg.top_k,
                  top_p=cfg.top_p, nbest=cfg.nbest, generator=generator, **limits)


__all__ = ["Hypothesis", "beam_search", "generate", "greedy", "mask_predict", "sample"]
