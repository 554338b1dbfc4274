"""Task metrics: G2P word/phoneme error rates; sacreBLEU and chrF for text; word and character
error rates for speech recognition; exact match for all."""

from __future__ import annotations


def edit_distance(a, b) -> int:
    """Levenshtein distance between two token sequences (rapidfuzz's C++ implementation)."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.distance(a, b)


def g2p_scores(hyps: list[str], refs: list[list[str]]) -> dict:
    """WER: a word is wrong unless it equals one of its references.
    PER: phoneme edits against the closest reference over that reference's length."""
    wrong = edits = ref_len = 0
    for hyp, ref_list in zip(hyps, refs):
        h = hyp.split()
        if hyp.split() not in [r.split() for r in ref_list]:
            wrong += 1
        best = min(((edit_distance(h, r.split()), len(r.split())) for r in ref_list))
        edits += best[0]
        ref_len += best[1]
    if not hyps:
        raise ValueError("nothing to score: no outputs")
    n = len(hyps)
    return {"wer": 100.0 * wrong / n, "per": 100.0 * edits / max(ref_len, 1), "n": len(hyps)}


def exact_match(hyps: list[str], refs: list[list[str]]) -> float:
    return 100.0 * sum(h in r for h, r in zip(hyps, refs)) / max(len(hyps), 1)


def text_scores(hyps: list[str], refs: list[list[str]]) -> dict:
    import sacrebleu

    n_refs = max(len(r) for r in refs) if refs else 1
    # sacreBLEU wants one stream per reference position; missing ones are None.
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(n_refs)]
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    b = bleu.corpus_score(hyps, streams)
    c = chrf.corpus_score(hyps, streams)
    return {"bleu": b.score, "chrf": c.score, "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature()), "n": len(hyps)}


def asr_scores(hyps: list[str], refs: list[list[str]]) -> dict:
    """Corpus-level WER (word edits / reference words) and CER (character edits, spaces
    included, / reference characters), against each input's first reference."""
    word_edits = words = char_edits = chars = 0
    for hyp, ref_list in zip(hyps, refs):
        ref = ref_list[0]
        word_edits += edit_distance(hyp.split(), ref.split())
        words += len(ref.split())
        h, r = " ".join(hyp.split()), " ".join(ref.split())
        char_edits += edit_distance(list(h), list(r))
        chars += len(r)
    return {"wer": 100.0 * word_edits / max(words, 1), "cer": 100.0 * char_edits / max(chars, 1),
            "words": words, "n": len(hyps)}


# name -> (scorer, the key that ranks checkpoints, whether higher is better)
METRICS = {
    "g2p": (g2p_scores, "wer", False),
    "text": (text_scores, "bleu", True),
    "asr": (asr_scores, "wer", False),
}


def score(metric: str, hyps: list[str], refs: list[list[str]]) -> dict:
    if not hyps:  # an error rate of nothing would read as perfect
        raise ValueError("nothing to score: no outputs")
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} outputs but {len(refs)} reference lists")
    scorer, _, _ = METRICS[metric]
    result = scorer(hyps, refs)
    result["exact_match"] = exact_match(hyps, refs)
    return result
