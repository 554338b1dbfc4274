"""Search over the model contract of ``encdec.models.base``: greedy, beam and sampling; and
Mask-Predict for non-autoregressive models (``method: nat``); CTC best path (``method: ctc``)
and joint CTC/attention beam search (``ctc_weight``) for models with a CTC head."""

from __future__ import annotations

import torch

from encdec.config import DecodeConfig
from encdec.decoding.beam import beam_search
from encdec.decoding.ctc import ctc_best_path
from encdec.data.vocab import PAD
from encdec.decoding.greedy import Hypothesis, greedy, max_lengths, sample
from encdec.decoding.nat import mask_predict

def generate(model, source, cfg: DecodeConfig, need_attention: bool = False,
             generator: torch.Generator | None = None) -> list[list[Hypothesis]]:
    """Hypotheses per input (best first) with the method and settings of ``cfg``. ``source``
    is the model's input batch: a (B, S) token tensor or a dict (``encode_source``)."""
    if cfg.method == "ctc":
        return ctc_best_path(model, source, need_attention)
    if cfg.method == "nat":
        src_tokens = source
        # Each input's own length bound, a * len(src) + b, not the padded batch width's.
        longest = max_lengths(src_tokens.ne(PAD), cfg.max_len_a, cfg.max_len_b)  # (B,)
        return mask_predict(model, src_tokens, iterations=cfg.iterations,
                            length_beam=cfg.length_beam, length_scale=cfg.length_scale,
                            nbest=cfg.nbest, max_output_len=longest,
                            need_attention=need_attention, early_exit=cfg.early_exit)
    limits = dict(max_len_a=cfg.max_len_a, max_len_b=cfg.max_len_b, need_attention=need_attention)
    one_beam = cfg.method == "beam" and cfg.beam_size == 1 and cfg.nbest == 1
    if cfg.method == "greedy" or (one_beam and cfg.ctc_weight == 0):
        return greedy(model, source, **limits)
    if cfg.method == "beam":
        return beam_search(model, source, beam_size=cfg.beam_size, nbest=cfg.nbest,
                           length_penalty=cfg.length_penalty,
                           ctc_weight=cfg.ctc_weight if cfg.ctc_weight > 0 else None, **limits)
    return sample(model, source, temperature=cfg.temperature, top_k=cfg.top_k,
                  top_p=cfg.top_p, nbest=cfg.nbest, generator=generator, **limits)


__all__ = ["Hypothesis", "beam_search", "ctc_best_path", "generate", "greedy", "mask_predict", "sample"]
