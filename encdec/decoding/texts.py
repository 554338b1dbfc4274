"""Decode lists of strings: tokenize, sort by length, batch, search, detokenize, restore order.

Shared by validation during training, `encdec evaluate`, `encdec translate` and the API.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from encdec.config import DecodeConfig
from encdec.data.dataset import pad
from encdec.data.vocab import UNK
from encdec.decoding import generate


@dataclass
class Translation:
    text: str  # detokenized output
    score: float  # model score (log-probability; length-normalized for beam search)
    src_tokens: list[str]  # source as the model saw it
    tokens: list[str]  # output tokens before detokenization
    attention: torch.Tensor | None = None  # (len(tokens) + 1, len(src_tokens)), when asked


def split_pieces(pieces: list[str], limit: int) -> list[list[str]]:
    """Cut a token list into segments of at most ``limit`` tokens, preferring to cut after a
    sentence-ending or clause-ending token in the second half of each window."""
    segments = []
    while len(pieces) > limit:
        cut = limit
        for end in (_SENTENCE_END, _CLAUSE_END):
            found = next((i + 1 for i in range(limit - 1, limit // 2 - 1, -1)
                          if pieces[i].strip("\u2581").endswith(end)), None)
            if found:
                cut = found
                break
        segments.append(pieces[:cut])
        pieces = pieces[cut:]
    segments.append(pieces)
    return segments


_SENTENCE_END = (".", "!", "?", "\u3002", "\uff01", "\uff1f")
_CLAUSE_END = (",", ";", ":", "\uff0c", "\u3001")


def _join(parts: list[Translation], src_pieces: list[str]) -> Translation:
    """One translation of a split input from the translations of its segments."""
    tokens = [t for p in parts for t in p.tokens]
    attention = None
    if all(p.attention is not None for p in parts):
        rows = len(tokens) + 1
        attention = torch.zeros(rows, len(src_pieces))
        r = c = 0
        for k, p in enumerate(parts):
            a = p.attention if k == len(parts) - 1 else p.attention[:-1]  # one EOS row, the last
            attention[r:r + a.shape[0], c:c + a.shape[1]] = a
            r += a.shape[0]
            c += len(p.src_tokens)
    score = sum(p.score * max(len(p.tokens), 1) for p in parts) / max(sum(max(len(p.tokens), 1)
                                                                          for p in parts), 1)
    return Translation(" ".join(p.text for p in parts if p.text), score, src_pieces, tokens,
                       attention)


def decode_texts(model, texts: list[str], *, src_tokenizer, src_vocab, tgt_tokenizer, tgt_vocab,
                 cfg: DecodeConfig, device="cpu", need_attention: bool = False,
                 max_src_tokens: int = 0, long_inputs: str = "split", progress=None,
                 warn=None, generator: torch.Generator | None = None,
                 search=generate) -> list[list[Translation]]:
    """For each input, its n-best translations (best first). Empty inputs give empty outputs.

    Inputs longer than ``max_src_tokens`` (0: no limit) are split into segments translated
    separately and joined (``long_inputs="split"``), or cut (``"truncate"``); ``warn(index,
    message)`` is told, as it is about source tokens outside the vocabulary.

    ``search``: what finds the hypotheses of a padded batch, called like ``generate``; another
    engine's (``encdec.decoding.ctranslate2``) can stand in.
    """
    if long_inputs not in ("split", "truncate"):
        raise ValueError(f"long_inputs must be split or truncate, not {long_inputs!r}")
    src_pieces = [src_tokenizer.encode(t) for t in texts]
    # Segments: (input index, pieces). Most inputs are one segment.
    segments: list[tuple[int, list[str]]] = []
    for i, pieces in enumerate(src_pieces):
        if max_src_tokens and len(pieces) > max_src_tokens:
            if long_inputs == "truncate":
                parts = [pieces[:max_src_tokens]]
                src_pieces[i] = parts[0]
                what = f"truncated to its first {max_src_tokens}"
            else:
                parts = split_pieces(pieces, max_src_tokens)
                what = f"split into {len(parts)} segments"
            if warn is not None:
                warn(i, f"input has {len(pieces)} tokens, more than the {max_src_tokens} the model "
                        f"was trained on; {what}")
        else:
            parts = [pieces]
        segments.extend((i, p) for p in parts)
    seg_ids = [src_vocab.encode(p) for _, p in segments]
    if warn is not None:
        unknown: dict[int, list[str]] = {}
        for (i, pieces), ids in zip(segments, seg_ids):
            unknown.setdefault(i, []).extend(p for p, t in zip(pieces, ids) if t == UNK)
        for i, toks in unknown.items():
            if toks:
                shown = " ".join(dict.fromkeys(t.strip("\u2581") or t for t in toks))
                warn(i, f"{len(toks)} source token(s) outside the vocabulary, read as <unk>: {shown}")
    seg_results: list[list[Translation] | None] = [None] * len(segments)
    for k, ids in enumerate(seg_ids):
        if not ids:
            seg_results[k] = [Translation("", 0.0, [], [])] * cfg.nbest
    # Longest first: the slowest batches start while memory is fresh; similar lengths batch well.
    order = sorted((k for k, ids in enumerate(seg_ids) if ids), key=lambda k: -len(seg_ids[k]))
    pending: dict[int, int] = {}
    for k in order:
        pending[segments[k][0]] = pending.get(segments[k][0], 0) + 1
    if progress is not None and len(pending) < len(texts):
        progress(len(texts) - len(pending))  # empty inputs are done already
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), cfg.batch_size):
            chunk = order[start:start + cfg.batch_size]
            src = pad([seg_ids[k] for k in chunk])
            hyps = search(model, src.to(device), cfg, need_attention=need_attention,
                          generator=generator)
            for k, nbest in zip(chunk, hyps):
                outs = []
                for h in nbest:
                    pieces = tgt_vocab.decode(h.tokens)
                    attn = (h.attention[:, : len(seg_ids[k])].cpu()
                            if h.attention is not None else None)
                    outs.append(Translation(tgt_tokenizer.decode(pieces), h.score,
                                            segments[k][1], pieces, attn))
                seg_results[k] = outs
            if progress is not None:
                done = 0
                for k in chunk:
                    pending[segments[k][0]] -= 1
                    done += pending[segments[k][0]] == 0
                progress(done)
    finally:
        model.train(was_training)
    return regroup([i for i, _ in segments], seg_results, len(texts),
                   lambda i, parts: _join(parts, src_pieces[i]))


def regroup(owners: list[int], results: list, n_inputs: int, join) -> list[list]:
    """Per input, its n-best list from its segments' n-best lists (``owners[k]``: the input of
    segment k, in order); an input of several segments gets ``join(input, segment results)``
    for each rank that every segment has."""
    by_input: dict[int, list] = {}
    for i, res in zip(owners, results):
        by_input.setdefault(i, []).append(res)
    out = []
    for i in range(n_inputs):
        parts = by_input[i]
        if len(parts) == 1:
            out.append(parts[0])
        else:
            n = min(len(p) for p in parts)
            out.append([join(i, [p[rank] for p in parts]) for rank in range(n)])
    return out
