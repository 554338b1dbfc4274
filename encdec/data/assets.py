"""What turns text into ids and back: tokenizers and vocabularies, plus the data meta.

Copied from the data directory into every run directory so a run alone can load a model.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from encdec.data.prepare import load_meta
from encdec.data.tokenizers import tokenizer_from_spec
from encdec.data.vocab import Vocab


@dataclass
class Assets:
    meta: dict
    src_tokenizer: object  # None for speech inputs
    src_vocab: Vocab | None
    tgt_tokenizer: object  # None for speech outputs (tts)
    tgt_vocab: Vocab | None
    audio_front: object = None  # speech inputs or outputs: encdec.data.utterances.AudioFront

    def audio_kwargs(self) -> dict:
        """The keyword arguments `decode_audio` needs."""
        return {"front": self.audio_front, "tgt_tokenizer": self.tgt_tokenizer,
                "tgt_vocab": self.tgt_vocab}

    @property
    def speech(self) -> bool:
        return self.meta.get("modality") == "speech"

    @property
    def tts(self) -> bool:
        return self.meta.get("modality") == "tts"

    def text_kwargs(self) -> dict:
        """The keyword arguments `decode_texts` needs."""
        return {"src_tokenizer": self.src_tokenizer, "src_vocab": self.src_vocab,
                "tgt_tokenizer": self.tgt_tokenizer, "tgt_vocab": self.tgt_vocab}


def load_assets(directory: str | Path) -> Assets:
    directory = Path(directory)
    meta = load_meta(directory)
    if meta.get("modality") == "speech":
        from encdec.data.utterances import AudioFront

        return Assets(meta, None, None, tokenizer_from_spec(meta["tgt_tokenizer"], directory),
                      Vocab.load(directory / "tgt.vocab"), AudioFront.load(directory, meta))
    if meta.get("modality") == "tts":
        from encdec.data.utterances import AudioFront

        return Assets(meta, tokenizer_from_spec(meta["src_tokenizer"], directory),
                      Vocab.load(directory / "src.vocab"), None,
                      None, AudioFront.load(directory, meta))
    return Assets(meta, tokenizer_from_spec(meta["src_tokenizer"], directory),
                  Vocab.load(directory / "src.vocab"),
                  tokenizer_from_spec(meta["tgt_tokenizer"], directory),
                  Vocab.load(directory / "tgt.vocab"))


def copy_assets(data_dir: str | Path, dest: str | Path) -> None:
    data_dir, dest = Path(data_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = ["meta.json"] + [p.name for p in data_dir.glob("spm.*")]
    names += [n for n in ("tgt.vocab", "src.vocab", "feats.stats.safetensors", "transcript.vocab",
                          "lexicon.tsv") if (data_dir / n).exists()]
    for name in names:
        shutil.copyfile(data_dir / name, dest / name)
