"""Greedy and beam search run by CTranslate2 on an export (``encdec export``), with encdec's
length limits, scores and n-best order.

``CTranslate2Search`` stands in for ``encdec.decoding.generate`` in ``decode_texts``: it takes
the same padded source ids and returns the same ``Hypothesis`` lists, so tokenization, long
input splitting, detokenization and warnings stay encdec's own.

How encdec's search is reproduced (see ``greedy.py`` and ``beam.py``):

* Length limit. encdec allows L = a * len(src) + b output tokens, </s> included, and forces
  </s> at step L - 1. CTranslate2 ends a hypothesis at ``max_decoding_length`` without a </s>,
  so it decodes L - 1 tokens freely, and each hypothesis is then rescored with </s>.
  Inputs are grouped by L, since ``max_decoding_length`` is one number per call.
* Scores. encdec never emits <pad> or <s> but does not renormalize the other tokens'
  log-probabilities; CTranslate2 rules them out (``suppress_sequences``) before its softmax,
  which raises every log-probability a little. So the hypotheses CTranslate2 finds are
  rescored teacher-forced (``score_batch``: log-probabilities over the whole vocabulary, </s>
  included), divided by (tokens + 1) ** length_penalty in beam search and summed in greedy
  search, and sorted by that score: the n-best order and the scores are encdec's. For the
  best of a beam only CTranslate2's best and the hypotheses it scores above encdec's score of
  that one need it (``_best_of``).
* Beam search. Both keep 2K candidates per step, end the </s> candidates among the first K
  and go on with the best K others. encdec stops an input at K ended hypotheses, keeping the
  first K, and ends its beams with </s> at the limit; CTranslate2 keeps the best K of all it
  ended, and at its last step ends the first K candidates, </s> or not. So an input that
  reaches that step is searched again keeping all that CTranslate2 ends (every input is,
  from the start, when an n-best list is asked for), and encdec's choice is made from them
  (``_finish_like_encdec``). What can still differ: at the step before the limit encdec goes
  on with the best K non-</s> candidates of 2K, and CTranslate2 has only those among the
  first K; and the renormalization above shifts scores inside the search, which can reorder
  near ties. Both are rare for the best output; the second shows in n-best lists of a model
  that gives <pad> and <s> real probability (label smoothing over a vocabulary of a dozen
  tokens), and vanishes when it gives them almost none.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from encdec.config import ConfigError, DecodeConfig
from encdec.data.vocab import BOS, EOS, PAD, SPECIALS, Vocab
from encdec.decoding.greedy import Hypothesis, max_lengths

METHODS = ("greedy", "beam")
EOS_TOKEN = SPECIALS[EOS]


class CTranslate2Search:
    """A CTranslate2 export as a search function: ``search(model, src_tokens, cfg)``."""

    engine = "ctranslate2"

    def __init__(self, export_dir: str | Path, device: str = "cpu", threads: int = 0):
        ctranslate2 = import_ctranslate2()
        self.export_dir = Path(export_dir)
        self.info = json.loads((self.export_dir / "encdec_export.json").read_text(encoding="utf-8"))
        self.positions = int(self.info["positions"])
        self.src_vocab = Vocab.load(self.export_dir / "src.vocab")
        self.tgt_vocab = Vocab.load(self.export_dir / "tgt.vocab")
        ct2_device, index = _device(device, ctranslate2)
        self.translator = ctranslate2.Translator(str(self.export_dir), device=ct2_device,
                                                 device_index=index, compute_type="default",
                                                 intra_threads=threads)

    def check(self, cfg: DecodeConfig, need_attention: bool = False) -> None:
        """ConfigError, naming the setting, for what this engine cannot do."""
        if cfg.method not in METHODS:
            raise ConfigError(f"decode.method={cfg.method!r} is not available with the "
                              "ctranslate2 engine, which runs greedy and beam search; use the "
                              "encdec engine for sampling, nat and ctc decoding")
        if need_attention:
            raise ConfigError("the ctranslate2 engine returns no attention weights; ask for "
                              "none, or use the encdec engine")

    def __call__(self, model, src_tokens: torch.Tensor, cfg: DecodeConfig,
                 need_attention: bool = False, generator=None) -> list[list[Hypothesis]]:
        """n-best hypotheses (token ids without </s>, encdec's scores) per row of the padded
        ``src_tokens`` (B, S). ``model`` is not used: the export is the model."""
        self.check(cfg, need_attention)
        rows = [[t for t in row if t != PAD] for row in src_tokens.tolist()]
        limits = max_lengths(src_tokens.ne(PAD), cfg.max_len_a, cfg.max_len_b).tolist()  # (B,)
        results: list[list[Hypothesis]] = [[] for _ in rows]
        for limit in sorted(set(limits)):
            which = [i for i, n in enumerate(limits) if n == limit]
            sources = [[self.src_vocab.itos[t] for t in rows[i]] for i in which]
            for i, hyps in zip(which, self._decode(sources, limit, cfg)):
                results[i] = hyps
        return results

    def _decode(self, sources: list[list[str]], limit: int, cfg: DecodeConfig):
        """n-best hypotheses of ``sources``, whose outputs may have ``limit`` tokens with </s>."""
        longest = max(limit, max(len(s) for s in sources))
        if longest > self.positions:
            raise ConfigError(
                f"inputs of {max(len(s) for s in sources)} tokens with decode.max_len_a="
                f"{cfg.max_len_a:g} and decode.max_len_b={cfg.max_len_b} need {longest} "
                f"positions; the export {self.export_dir} has {self.positions}: lower them, "
                "or use the encdec engine")
        beam = cfg.beam_size if cfg.method == "beam" else 1
        if beam > 1 and limit > 1:
            candidates, sums = self._beam(sources, limit, cfg)
        else:
            if limit == 1:  # </s> is forced at the first step: only the empty output
                candidates = [[[]] for _ in sources]
            else:
                candidates = [r.hypotheses for r in self._translate(sources, limit, beam_size=1)]
            sums = self._score(sources, candidates)
        results = []
        for hyps, scores in zip(candidates, sums):
            if beam > 1:  # as beam search normalizes; greedy scores are plain sums
                scores = [_normalized(t, s, cfg.length_penalty) for t, s in zip(hyps, scores)]
            ranked = sorted(zip(hyps, scores), key=lambda h: -h[1])[:cfg.nbest]  # stable
            results.append([Hypothesis(self.tgt_vocab.encode(t), s) for t, s in ranked])
        return results

    def _translate(self, sources, limit: int, **options):
        # L - 1 free steps; </s> at step L - 1 is added by rescoring (module docstring).
        return self.translator.translate_batch(
            sources, max_decoding_length=limit - 1, min_decoding_length=0, max_input_length=0,
            suppress_sequences=[[SPECIALS[PAD]], [SPECIALS[BOS]]], **options)

    def _score(self, sources, candidates) -> list[list[float]]:
        """encdec's score of each candidate: the summed log-probabilities of its tokens and
        </s>, teacher-forced over the whole vocabulary."""
        flat = [(k, tokens) for k, hyps in enumerate(candidates) for tokens in hyps]
        if not flat:
            return [[] for _ in candidates]
        scored = self.translator.score_batch([sources[k] for k, _ in flat],
                                             [tokens for _, tokens in flat], max_input_length=0)
        out: list[list[float]] = [[] for _ in candidates]
        for (k, _), result in zip(flat, scored):
            out[k].append(sum(result.log_probs))
        return out

    def _beam(self, sources, limit: int, cfg: DecodeConfig):
        """The hypotheses encdec's beam search finishes, per input (tokens without </s>), and
        their summed log-probabilities (``_score``); for a 1-best only the one that wins.

        First as encdec stops: at K finished hypotheses. That gives encdec's best output unless
        the search reached the last free step, L - 2, where CTranslate2 ends every beam it
        ranks among the first K, and keeps the best K of all it ended, not the first K. Those
        inputs are searched again keeping all hypotheses (fewer than 2K), and encdec's choice
        is made from them (``_finish_like_encdec``). An n-best list needs every hypothesis
        ended before the search stops, so it keeps them all from the start."""
        K = cfg.beam_size
        # encdec normalizes with (tokens + 1) ** length_penalty; 0 would let CTranslate2 stop
        # at the first finished top beam, so a penalty too small to change a float stands in.
        options = {"beam_size": K, "length_penalty": cfg.length_penalty or 1e-30,
                   "return_end_token": True, "return_scores": True}
        candidates: list = [None] * len(sources)
        sums: list = [None] * len(sources)
        again = list(range(len(sources)))
        if cfg.nbest == 1:
            found = self._translate(sources, limit, num_hypotheses=K, **options)
            again = [k for k, r in enumerate(found)
                     if not r.hypotheses or any(_step(t, limit) == limit - 2 for t in r.hypotheses)]
            stopped = sorted(set(range(len(sources))) - set(again))
            best = self._best_of([sources[k] for k in stopped], [found[k] for k in stopped],
                                 cfg.length_penalty)
            for k, (tokens, total) in zip(stopped, best):
                candidates[k], sums[k] = [tokens], [total]
            patience = 2  # fewer than K finished before step L - 2, K more at it
        else:
            patience = limit - 1  # at most K finish per step: all of them are kept
        if again:
            found = self._translate([sources[k] for k in again], limit, patience=patience,
                                    num_hypotheses=K * patience, **options)
            finished = [self._finish_like_encdec(sources[k], result, limit, K)
                        for k, result in zip(again, found)]
            for k, hyps, totals in zip(again, finished,
                                       self._score([sources[k] for k in again], finished)):
                candidates[k], sums[k] = hyps, totals
        return candidates, sums

    def _best_of(self, sources, found, length_penalty: float):
        """encdec's best of each input's hypotheses (all ended with </s>, CTranslate2's best
        first) and its summed log-probabilities. CTranslate2's score of a hypothesis is
        encdec's raised by the probability of <pad> and <s> it took out, never lowered; so
        only those it scores above encdec's score of its own best can beat that, and only
        those are rescored."""
        hyps = [[_strip_eos(t) for t in r.hypotheses] for r in found]
        firsts = self._score(sources, [h[:1] for h in hyps])
        best = [(h[0], total[0]) for h, total in zip(hyps, firsts)]
        # (less a margin for the two libraries' float rounding)
        rivals = [[t for t, theirs in zip(h[1:], r.scores[1:])
                   if theirs > _normalized(*b, length_penalty) - 1e-4]
                  for h, r, b in zip(hyps, found, best)]
        for k, (tokens_list, totals) in enumerate(zip(rivals, self._score(sources, rivals))):
            for tokens, total in zip(tokens_list, totals):
                if _normalized(tokens, total, length_penalty) > \
                        _normalized(*best[k], length_penalty):
                    best[k] = (tokens, total)
        return best

    def _finish_like_encdec(self, source, result, limit: int, K: int) -> list[list[str]]:
        """From every hypothesis CTranslate2 ended, those encdec's beam search finishes: the
        first K to end with </s> (by step, then score), and if fewer than K did by step
        L - 2, the best of the beams that reached it, each with </s> forced."""
        ended = sorted((h for h in zip(result.hypotheses, result.scores)
                        if h[0][-1:] == [EOS_TOKEN]),
                       key=lambda h: (len(h[0]), -h[1]))  # same length: CTranslate2's ranking
        kept = [tokens[:-1] for tokens, _ in ended[:K]]
        if len(kept) == K:
            return kept
        capped = [t for t in result.hypotheses if t[-1:] != [EOS_TOKEN]]
        if not capped:
            return kept
        scores = self._score([source], [capped])[0]
        best = sorted(zip(capped, scores), key=lambda h: -h[1])[:K - len(kept)]
        return kept + [t for t, _ in best]


def _step(tokens: list[str], limit: int) -> int:
    """The step at which CTranslate2 ended a hypothesis (return_end_token=True): the step of
    its </s>, or the last free step, L - 2, for one that reached it without."""
    return len(tokens) - 1 if tokens[-1:] == [EOS_TOKEN] else limit - 2


def _normalized(tokens: list[str], total: float, length_penalty: float) -> float:
    """Beam search's score: the log-probability over (tokens + 1) ** length_penalty."""
    return total / (len(tokens) + 1) ** length_penalty


def _strip_eos(tokens: list[str]) -> list[str]:
    return tokens[:-1] if tokens[-1:] == [EOS_TOKEN] else tokens


def import_ctranslate2():
    """The ctranslate2 package, or a ConfigError that says how to install it."""
    try:
        import ctranslate2
    except ImportError:
        raise ConfigError("CTranslate2 export and decoding need the ctranslate2 package: "
                          "pip install ctranslate2 (make setup installs it)") from None
    return ctranslate2


def _device(device: str, ctranslate2) -> tuple[str, int]:
    """encdec's device names (cpu, cuda, cuda:N, auto) as CTranslate2's (device, index)."""
    if device == "auto":
        return ("cuda", 0) if ctranslate2.get_cuda_device_count() > 0 else ("cpu", 0)
    if device == "cpu":
        return "cpu", 0
    if device == "cuda" or device.startswith("cuda:"):
        index = device.partition(":")[2]
        if index and not index.isdigit():
            raise ConfigError(f"device {device!r}: write cuda or cuda:N")
        return "cuda", int(index or 0)
    raise ConfigError(f"device {device!r}: the ctranslate2 engine runs on cpu, cuda, cuda:N "
                      "or auto")
