"""Decode lists of strings: tokenize, sort by length, batch, search, detokenize, restore order.

Shared by validation during training, `encdec evaluate`, `encdec translate` and the API.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from encdec.config import DecodeConfig
from encdec.data.vocab import PAD
from encdec.decoding import generate


@dataclass
class Translation:
    text: str  # detokenized output
    score: float  # model score (log-probability; length-normalized for beam search)
    src_tokens: list[str]  # source as the model saw it
    tokens: list[str]  # output tokens before detokenization
    attention: torch.Tensor | None = None  # (len(tokens) + 1, len(src_tokens)), when asked


def decode_texts(model, texts: list[str], *, src_tokenizer, src_vocab, tgt_tokenizer, tgt_vocab,
                 cfg: DecodeConfig, device="cpu", need_attention: bool = False,
                 max_src_tokens: int = 0, progress=None,
                 generator: torch.Generator | None = None) -> list[list[Translation]]:
    """For each input, its n-best translations (best first). Empty inputs give empty outputs."""
    src_pieces = [src_tokenizer.encode(t) for t in texts]
    if max_src_tokens:
        src_pieces = [p[:max_src_tokens] for p in src_pieces]
    src_ids = [src_vocab.encode(p) for p in src_pieces]
    results: list[list[Translation] | None] = [None] * len(texts)
    for i, ids in enumerate(src_ids):
        if not ids:
            results[i] = [Translation("", 0.0, [], [])] * cfg.nbest
    # Longest first: the slowest batches start while memory is fresh; similar lengths batch well.
    order = sorted((i for i, ids in enumerate(src_ids) if ids), key=lambda i: -len(src_ids[i]))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), cfg.batch_size):
            chunk = order[start:start + cfg.batch_size]
            width = max(len(src_ids[i]) for i in chunk)
            src = torch.full((len(chunk), width), PAD, dtype=torch.long)
            for row, i in enumerate(chunk):
                src[row, : len(src_ids[i])] = torch.tensor(src_ids[i])
            hyps = generate(model, src.to(device), cfg, need_attention=need_attention,
                            generator=generator)
            for i, nbest in zip(chunk, hyps):
                outs = []
                for h in nbest:
                    pieces = tgt_vocab.decode(h.tokens)
                    outs.append(Translation(tgt_tokenizer.decode(pieces), h.score, src_pieces[i],
                                            pieces, h.attention))
                results[i] = outs
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return results
