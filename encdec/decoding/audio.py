"""Decode lists of waveforms: segment long audio, featurize, sort by length, batch, search,
detokenize, restore order. The speech twin of ``decoding/texts.py``, shared by validation,
`encdec evaluate`, `encdec transcribe`, the Python API and the server.
"""

from __future__ import annotations

import torch

from encdec.config import DecodeConfig
from encdec.decoding import generate
from encdec.decoding.texts import Translation, regroup



def _join(parts: list[Translation]) -> Translation:
    """One result for audio decoded in segments (alignments are per segment, so none)."""
    tokens = [t for p in parts for t in p.tokens]
    return Translation(" ".join(p.text for p in parts if p.text), sum(p.score for p in parts),
                       [], tokens, None)


def decode_audio(model, waves: list[torch.Tensor], *, front, tgt_tokenizer, tgt_vocab,
                 cfg: DecodeConfig, device="cpu", need_attention: bool = False,
                 max_segment_s: float = 0.0, max_batch_s: float = 200.0, progress=None,
                 warn=None) -> list[list[Translation]]:
    """For each (N,) mono waveform at ``front.sample_rate``, its n-best transcripts.

    Audio longer than ``max_segment_s`` (0: no limit) is cut at quiet points into segments
    decoded separately and joined (``warn(index, message)`` is told). ``attention`` is the
    decoder's cross-attention over encoder positions (or, for ``method ctc``, each token's
    CTC posterior per position), one row per output token plus the end.
    """
    rate = front.sample_rate
    segments: list[tuple[int, torch.Tensor]] = []  # (input index, samples)
    for i, wave in enumerate(waves):
        if max_segment_s and wave.numel() > max_segment_s * rate:
            from encdec.audio.io import split_long

            cuts = split_long(wave, rate, max_seconds=max_segment_s)
            if warn is not None:
                warn(i, f"{wave.numel() / rate:.1f} s of audio is longer than "
                        f"{max_segment_s:g} s; decoded in {len(cuts)} segments cut at quiet points")
            segments.extend((i, wave[a:b]) for a, b in cuts)
        else:
            segments.append((i, wave))
    order = sorted(range(len(segments)), key=lambda k: -segments[k][1].numel())
    results: list[list[Translation] | None] = [None] * len(segments)
    pending: dict[int, int] = {}
    for i, _ in segments:
        pending[i] = pending.get(i, 0) + 1
    # Batches of at most cfg.batch_size inputs and max_batch_s seconds of padded audio: the
    # conv front's activations grow with the audio, not the number of inputs.
    chunks, budget = [], max_batch_s * rate
    for k in order:
        if chunks and len(chunks[-1]) < cfg.batch_size and \
                (len(chunks[-1]) + 1) * segments[chunks[-1][0]][1].numel() <= budget:
            chunks[-1].append(k)
        else:
            chunks.append([k])
    was_training = model.training
    model.eval()
    try:
        for chunk in chunks:
            feats, lengths = front([segments[k][1] for k in chunk])
            source = {"src_feats": feats.to(device), "src_lengths": lengths.to(device)}
            hyps = generate(model, source, cfg, need_attention=need_attention)
            for k, nbest in zip(chunk, hyps):
                outs = []
                for h in nbest:
                    pieces = tgt_vocab.decode(h.tokens)
                    attn = h.attention.cpu() if h.attention is not None else None
                    outs.append(Translation(tgt_tokenizer.decode(pieces), h.score, [], pieces,
                                            attn))
                results[k] = outs
            if progress is not None:
                done = 0
                for k in chunk:
                    pending[segments[k][0]] -= 1
                    done += pending[segments[k][0]] == 0
                progress(done)
    finally:
        model.train(was_training)
    return regroup([i for i, _ in segments], results, len(waves), lambda i, parts: _join(parts))
