"""Tokenizers: text <-> token strings. Characters, whitespace, or SentencePiece subwords.

A tokenizer is described by a small JSON-able spec (``{"kind": "char", "lowercase": true}``)
stored in the data directory's meta.json, so a run directory can rebuild it exactly.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

SPACE = "\u2581"  # "▁", stands for a space inside character sequences, as in SentencePiece


def _normalize(text: str, lowercase: bool) -> str:
    text = unicodedata.normalize("NFC", text).strip()
    return text.lower() if lowercase else text


class CharTokenizer:
    """One token per character; spaces become "▁" so they survive as tokens."""

    kind = "char"

    def __init__(self, lowercase: bool = False):
        self.lowercase = lowercase

    def encode(self, text: str) -> list[str]:
        text = " ".join(_normalize(text, self.lowercase).split())
        return [SPACE if ch == " " else ch for ch in text]

    def decode(self, tokens: list[str]) -> str:
        return "".join(tokens).replace(SPACE, " ").strip()

    def spec(self) -> dict:
        return {"kind": self.kind, "lowercase": self.lowercase}


class WhitespaceTokenizer:
    """Tokens are the whitespace-separated words (phoneme strings, pre-tokenized text)."""

    kind = "whitespace"

    def __init__(self, lowercase: bool = False):
        self.lowercase = lowercase

    def encode(self, text: str) -> list[str]:
        return _normalize(text, self.lowercase).split()

    def decode(self, tokens: list[str]) -> str:
        return " ".join(tokens)

    def spec(self) -> dict:
        return {"kind": self.kind, "lowercase": self.lowercase}


class SentencePieceTokenizer:
    """SentencePiece BPE or unigram model trained on the training split."""

    kind = "sentencepiece"

    def __init__(self, model_path: str | Path, lowercase: bool = False):
        import sentencepiece as spm

        self.model_path = Path(model_path)
        self.lowercase = lowercase
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_path))

    @classmethod
    def train(cls, lines: list[str], model_prefix: str | Path, vocab_size: int,
              model_type: str = "bpe", lowercase: bool = False) -> "SentencePieceTokenizer":
        import sentencepiece as spm

        from encdec.data.corpus import DataError
        from encdec.files import free_space, write_error

        sentences = [_normalize(t, lowercase) for t in lines]
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(sentences), model_prefix=str(model_prefix),
                vocab_size=vocab_size, model_type=model_type, character_coverage=1.0,
                # Our vocabulary adds its own specials; SentencePiece's ids are not used.
                pad_id=-1, bos_id=-1, eos_id=-1, unk_id=0, hard_vocab_limit=False,
                input_sentence_size=2_000_000, shuffle_input_sentence=True,
                num_threads=2, minloglevel=2,
            )
            return cls(f"{model_prefix}.model", lowercase=lowercase)
        except OSError as err:
            raise DataError(write_error("the SentencePiece model", f"{model_prefix}.model",
                                        err)) from None
        except RuntimeError as err:  # SentencePiece reports its own failures this way
            raise DataError(f"SentencePiece training for {model_prefix}.model failed "
                            f"({len(sentences)} sentences, vocab size {vocab_size}, "
                            f"{model_type}; {free_space(model_prefix)}): {err}") from None

    def encode(self, text: str) -> list[str]:
        return self.sp.encode(_normalize(text, self.lowercase), out_type=str)

    def decode(self, tokens: list[str]) -> str:
        return self.sp.decode_pieces(list(tokens))

    def spec(self) -> dict:
        return {"kind": self.kind, "lowercase": self.lowercase, "model": self.model_path.name}


TOKENIZERS = {"char": CharTokenizer, "whitespace": WhitespaceTokenizer,
              "sentencepiece": SentencePieceTokenizer, "phonemes": None}  # phonemes: encdec.data.tts


def tokenizer_from_spec(spec: dict, directory: str | Path):
    kind = spec.get("kind")
    if kind not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(TOKENIZERS)}")
    if kind == "sentencepiece":
        return SentencePieceTokenizer(Path(directory) / spec["model"], spec.get("lowercase", False))
    if kind == "phonemes":
        from encdec.data.tts import PhonemeTokenizer

        return PhonemeTokenizer.load(directory)
    return TOKENIZERS[kind](lowercase=spec.get("lowercase", False))
