"""`encdec prepare --stream`: the same data directory as the in-memory path, without the corpus
in memory; bounded sampling for SentencePiece; errors naming file and line from a worker."""

import json
import random

import numpy as np
import pytest
import sentencepiece as spm

from encdec.cli import main
from encdec.data.corpus import DataError
from encdec.data.dataset import BinarizedSplit
from encdec.data.stream import Source, _sample, prepare_stream

WORDS = ["the", "lord", "said", "unto", "moses", "and", "god", "naïve", "¿qué", "house", "of",
         "israel", "Ünïcödé"]


def _corpus(path, n=1500, seed=0):
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(0, 12)))
        t = " ".join(rng.choice(WORDS).upper() for _ in range(rng.randint(1, 12)))
        rows.append((s if i % 97 else "  ", t))
        if i % 11 == 0:  # the same source again: a second reference under --group-refs
            rows.append((s, t[::-1]))
    path.write_text("".join(f"{s}\t{t}\n" for s, t in rows), encoding="utf-8")
    return rows


def _pieces(path):
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]


def _same_directory(a, b):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.endswith(".model"):  # the file records its training path; compare the pieces
            assert _pieces(a / name) == _pieces(b / name), name
        elif name == "meta.json":
            ma = json.loads((a / name).read_text())
            mb = json.loads((b / name).read_text())
            assert mb.pop("stream")["chunks"] > 1
            assert ma == mb
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("case", ["spm-hash-split-group-refs", "joint-spm-dev-test",
                                  "char-whitespace-parallel-files"])
def test_stream_writes_the_same_directory_as_in_memory_prepare(tmp_path, case):
    rows = _corpus(tmp_path / "c.tsv")
    common = ["--vocab-size", "60", "--max-len", "20"]
    if case == "spm-hash-split-group-refs":
        args = ["--train", str(tmp_path / "c.tsv"), "--group-refs"]
    elif case == "joint-spm-dev-test":
        _corpus(tmp_path / "dev.tsv", 60, seed=1)
        _corpus(tmp_path / "test.tsv", 60, seed=2)
        args = ["--train", str(tmp_path / "c.tsv"), "--dev", str(tmp_path / "dev.tsv"),
                "--test", str(tmp_path / "test.tsv"), "--joint-vocab", "--lowercase"]
    else:
        (tmp_path / "c.src").write_text("".join(s + "\n" for s, _ in rows), encoding="utf-8")
        (tmp_path / "c.tgt").write_text("".join(t + "\n" for _, t in rows), encoding="utf-8")
        args = ["--train", str(tmp_path / "c.src"), str(tmp_path / "c.tgt"),
                "--src-tokenizer", "char", "--tgt-tokenizer", "whitespace"]
    main(["prepare", *args, *common, "--out", str(tmp_path / "mem")])
    main(["prepare", *args, *common, "--out", str(tmp_path / "stream"), "--stream",
          "--workers", "2", "--chunk-pairs", "400"])
    _same_directory(tmp_path / "mem", tmp_path / "stream")
    split = BinarizedSplit(tmp_path / "stream", "train")
    assert isinstance(split.src_tokens, np.memmap)  # training reads it without loading it


def test_tokenizer_sample_is_bounded_uniform_and_independent_of_chunking(tmp_path):
    rows = _corpus(tmp_path / "c.tsv", 3000)
    source = {"train": Source([tmp_path / "c.tsv"])}
    a = _sample(source, 250, False, 500, 7, 1, log=lambda *_: None)
    b = _sample(source, 1000, False, 500, 7, 1, log=lambda *_: None)
    c = _sample(source, 1000, False, 500, 8, 1, log=lambda *_: None)
    assert a == b and len(a) == 500 and a != c
    kept = [(s.strip(), t) for s, t in rows if s.strip()]
    positions = [kept.index(p) for p in a]
    assert positions == sorted(positions)  # corpus order
    assert np.mean(positions) == pytest.approx(len(kept) / 2, rel=0.1)  # not the first 500
    everything = _sample(source, 250, False, 10 ** 6, 7, 1, log=lambda *_: None)
    assert everything == kept


def test_stream_errors_name_the_file_and_line_from_a_worker(tmp_path):
    path = tmp_path / "bad.tsv"
    lines = [f"word{i}\tW {i}" for i in range(1000)]
    lines[733] = "three\tfields\there"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.tsv:734: expected 2 tab-separated fields"):
        prepare_stream([path], tmp_path / "out", src_tokenizer={"kind": "char"},
                       tgt_tokenizer={"kind": "whitespace"}, chunk_pairs=300, workers=2,
                       log=lambda *_: None)
    assert not (tmp_path / "out").exists() and len(list(tmp_path.iterdir())) == 1  # no leftovers
    (tmp_path / "a.src").write_text("x\ny\nz\n")
    (tmp_path / "a.tgt").write_text("X\nY\n")
    with pytest.raises(DataError, match=r"a\.src has 3 lines but .*a\.tgt has 2.*unpaired line: 3"):
        prepare_stream([tmp_path / "a.src", tmp_path / "a.tgt"], tmp_path / "out",
                       src_tokenizer={"kind": "char"}, tgt_tokenizer={"kind": "char"},
                       workers=1, log=lambda *_: None)


def test_stream_is_refused_for_recipes_and_audio_lists(tmp_path, capsys):
    assert main(["prepare", "g2p-cmudict", "--stream"]) != 0
    assert "--stream prepares a user corpus" in capsys.readouterr().err
