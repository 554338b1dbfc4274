import json

import numpy as np
import pytest

from encdec.cli import main
from encdec.data.corpus import DataError, read_jsonl, read_lines, read_parallel, read_tsv
from encdec.data.dataset import BinarizedSplit, collate, shard, token_batches
from encdec.data.recipes import g2p_cmudict, hash_split
from encdec.data.tokenizers import CharTokenizer, SentencePieceTokenizer, WhitespaceTokenizer
from encdec.data.vocab import BOS, EOS, PAD, UNK, Vocab


def test_char_and_whitespace_round_trip():
    char = CharTokenizer()
    for text in ["hello world", "naïve café", "日本語 テキスト", "a  b"]:
        assert char.decode(char.encode(text)) == " ".join(text.split())
    ws = WhitespaceTokenizer()
    assert ws.decode(ws.encode("HH AH L OW")) == "HH AH L OW"
    assert CharTokenizer(lowercase=True).encode("AbC") == ["a", "b", "c"]


def test_sentencepiece_round_trip(tmp_path):
    lines = [f"the quick brown fox number {i} jumps over the lazy dog" for i in range(200)]
    lines += ["¿Dónde está la biblioteca?", "Ünïcödé text ✓"] * 20
    tok = SentencePieceTokenizer.train(lines, tmp_path / "spm", vocab_size=80)
    for text in ["the quick brown fox", "¿Dónde está la biblioteca?", "Ünïcödé text ✓"]:
        assert tok.decode(tok.encode(text)) == text
    again = SentencePieceTokenizer(tmp_path / "spm.model")
    assert again.encode("the lazy dog") == tok.encode("the lazy dog")


def test_vocab_specials_unknown_and_decode_stops_at_eos(tmp_path):
    from collections import Counter

    v = Vocab.build(Counter("aabbbc"))
    assert v.itos[:4] == ["<pad>", "<s>", "</s>", "<unk>"] and v.itos[4] == "b"
    assert v.encode(["z"]) == [UNK]
    assert v.decode([BOS, v.stoi["a"], EOS, v.stoi["b"]]) == ["a"]
    v.save(tmp_path / "v")
    assert Vocab.load(tmp_path / "v").itos == v.itos


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"ok\nfine\nbad \xff\xfe here\n")
    with pytest.raises(DataError, match=r"bad\.txt:3: invalid UTF-8"):
        read_lines(path)


def test_nul_byte_names_file_and_line(tmp_path):
    path = tmp_path / "nul.txt"
    path.write_bytes(b"one\ntw\x00o\n")
    with pytest.raises(DataError, match=r"nul\.txt:2: NUL byte"):
        read_lines(path)


def test_mismatched_line_counts(tmp_path):
    (tmp_path / "a.src").write_text("x\ny\nz\n")
    (tmp_path / "a.tgt").write_text("X\nY\n")
    with pytest.raises(DataError, match=r"a\.src has 3 lines but .*a\.tgt has 2"):
        read_parallel(tmp_path / "a.src", tmp_path / "a.tgt")


def test_tsv_and_jsonl_errors(tmp_path):
    (tmp_path / "c.tsv").write_text("a\tb\nno tab here\n")
    with pytest.raises(DataError, match=r"c\.tsv:2: expected 2 tab-separated fields"):
        read_tsv(tmp_path / "c.tsv")
    (tmp_path / "c.jsonl").write_text('{"src": "a", "tgt": "b"}\n{"src": 1}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:2: expected an object"):
        read_jsonl(tmp_path / "c.jsonl")
    (tmp_path / "d.jsonl").write_text('{"src": "a", "tgt": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        read_jsonl(tmp_path / "d.jsonl")


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    (tmp_path / "s.txt").write_bytes(b"a\n\xc3\x28\n")
    (tmp_path / "t.txt").write_text("A\nB\n")
    code = main(["prepare", "--train", str(tmp_path / "s.txt"), str(tmp_path / "t.txt"),
                 "--out", str(tmp_path / "out"), "--src-tokenizer", "char"])
    assert code == 2
    err = capsys.readouterr().err
    assert "s.txt:2: invalid UTF-8" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_prepare_drops_and_counts_empty_and_long_pairs(tmp_path):
    lines = ["ab\tA B", "\tX", "cd\t", "   \t  ", "abcdefghij\tA", "ef\tE F", "gh\tG H"]
    (tmp_path / "t.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "d"
    assert main(["prepare", "--train", str(tmp_path / "t.tsv"), "--dev", str(tmp_path / "t.tsv"),
                 "--test", str(tmp_path / "t.tsv"), "--out", str(out), "--src-tokenizer", "char",
                 "--tgt-tokenizer", "whitespace", "--max-len", "5"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    st = meta["splits"]["train"]
    assert (st["pairs"], st["dropped_empty"], st["dropped_too_long"]) == (3, 3, 1)
    split = BinarizedSplit(out, "train")
    assert len(split) == 3
    assert isinstance(split.src_tokens, np.memmap)
    vocab = Vocab.load(out / "src.vocab")
    assert vocab.decode(split.src(0)) == ["a", "b"]


def test_user_corpus_split_by_hash_when_no_dev_test(tmp_path):
    (tmp_path / "s").write_text("".join(f"w{i}\n" for i in range(400)))
    (tmp_path / "t").write_text("".join(f"W {i}\n" for i in range(400)))
    assert main(["prepare", "--train", str(tmp_path / "s"), str(tmp_path / "t"), "--out",
                 str(tmp_path / "d"), "--src-tokenizer", "char"]) == 0
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    sizes = [meta["splits"][s]["pairs"] for s in ("train", "dev", "test")]
    assert sum(sizes) == 400 and min(sizes) > 0


def test_g2p_recipe_splits_by_word_and_strips_stress():
    corpus = g2p_cmudict()
    words = {split: {w for w, _ in pairs} for split, pairs in corpus.splits.items()}
    assert not (words["train"] & words["dev"]) and not (words["train"] & words["test"])
    assert not (words["dev"] & words["test"])
    total = sum(len(w) for w in words.values())
    assert 0.88 < len(words["train"]) / total < 0.92
    for split, pairs in corpus.splits.items():
        for w, phones in pairs[:2000]:
            assert all(c.isalpha() and c.islower() or c == "'" for c in w)
            assert not any(ch.isdigit() for ch in phones)
    train = dict()
    for w, p in corpus.splits["train"]:
        train.setdefault(w, []).append(p)
    assert any(len(p) > 1 for p in train.values())  # alternative pronunciations kept
    assert hash_split("hello") == hash_split("hello")


def test_token_batches_respect_budget_and_are_deterministic():
    rng = np.random.default_rng(0)
    src = rng.integers(1, 30, 500)
    tgt = rng.integers(1, 30, 500)
    a = token_batches(src, tgt, 200, seed=1, epoch=0)
    b = token_batches(src, tgt, 200, seed=1, epoch=0)
    c = token_batches(src, tgt, 200, seed=1, epoch=1)
    assert all((x == y).all() for x, y in zip(a, b))
    assert any(len(x) != len(y) or (x != y).any() for x, y in zip(a, c))
    seen = np.sort(np.concatenate(a))
    assert (seen == np.arange(500)).all()
    for batch in a:
        width = max(max(src[batch]), max(tgt[batch]) + 1)
        assert width * len(batch) <= 200 or len(batch) == 1


def _batches_one_pair_at_a_time(src, tgt, max_tokens, seed, epoch, shuffle=True, max_len=0):
    """token_batches written plainly: sort with np.lexsort, grow each batch pair by pair."""
    rng = np.random.default_rng([seed, epoch])
    idx = np.arange(len(src))
    if max_len:
        idx = idx[(src <= max_len) & (tgt <= max_len)]
    noise = rng.random(len(idx)) if shuffle else np.arange(len(idx))
    order = idx[np.lexsort((noise, src[idx], tgt[idx]))]
    batches, start, widest = [], 0, 0
    for pos in range(len(order)):
        w = int(max(src[order[pos]], tgt[order[pos]] + 1))
        if pos > start and max(widest, w) * (pos - start + 1) > max_tokens:
            batches.append(order[start:pos])
            start, widest = pos, 0
        widest = max(widest, w)
    if start < len(order):
        batches.append(order[start:])
    if shuffle:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


@pytest.mark.parametrize("seed", range(6))
def test_token_batches_equal_the_plain_pair_by_pair_packing(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    src, tgt = rng.integers(1, 300, n), rng.integers(1, 300, n)
    for max_tokens, max_len, shuffle in [(200, 0, True), (4096, 256, True), (50, 0, False),
                                         (100_000, 100, True)]:
        got = token_batches(src, tgt, max_tokens, seed=seed, epoch=2, shuffle=shuffle,
                            max_len=max_len)
        want = _batches_one_pair_at_a_time(src, tgt, max_tokens, seed, 2, shuffle, max_len)
        assert [b.tolist() for b in got] == [b.tolist() for b in want]


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_ranks_batches_together_are_the_epoch_without_drops_or_repeats(world):
    rng = np.random.default_rng(world)
    for n, budget in [(500, 200), (37, 120), (world, 30), (9, 30)]:
        src, tgt = rng.integers(1, 30, n), rng.integers(1, 30, n)
        if budget == 30:
            src[:] = 30  # one pair per batch: nothing to halve
        epoch = token_batches(src, tgt, budget, seed=1, epoch=0)
        ranks = [shard(epoch, r, world) for r in range(world)]
        assert len({len(r) for r in ranks}) == 1  # lock-step
        seen = np.sort(np.concatenate([b for r in ranks for b in r]))
        if budget == 30:  # the remainder (fewer than `world` pairs) is left out, nothing repeated
            assert len(seen) == n - n % world and len(set(seen)) == len(seen)
        else:
            assert (seen == np.arange(n)).all(), (n, budget)  # every pair once
        for batch in (b for r in ranks for b in r):
            width = max(max(src[batch]), max(tgt[batch]) + 1)
            assert len(batch) and (width * len(batch) <= budget or len(batch) == 1)
        full_rounds = len(epoch) // world * world - world  # untouched before the last round
        evened = [b for step in zip(*ranks) for b in step]
        assert all((x == y).all() for x, y in zip(epoch[:max(full_rounds, 0)], evened))


def test_collate_adds_bos_and_eos(tiny_data):
    split = BinarizedSplit(tiny_data, "train")
    batch = collate(split, np.array([0, 1, 2]))
    assert (batch.tgt_in[:, 0] == BOS).all()
    for b in range(3):
        n = len(split.tgt(b))
        assert batch.tgt_out[b, n] == EOS
        assert (batch.tgt_in[b, 1:n + 1] == batch.tgt_out[b, :n]).all()
        assert (batch.src_tokens[b, len(split.src(b)):] == PAD).all()
    assert batch.num_tgt_tokens == sum(len(split.tgt(b)) + 1 for b in range(3))


def test_recipe_preparation_is_cached(tmp_path, capsys):
    out = tmp_path / "g2p"
    assert main(["prepare", "g2p-cmudict", "--out", str(out)]) == 0
    first = (out / "meta.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(["prepare", "g2p-cmudict", "--out", str(out)]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert (out / "meta.json").stat().st_mtime_ns == first


def _prepare_tsv(tmp_path, name, lines, *extra):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return main(["prepare", "--train", str(path), "--out", str(tmp_path / "d"),
                 "--src-tokenizer", "char", "--tgt-tokenizer", "whitespace", *extra])


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".old")))


@pytest.mark.parametrize("case", ["too_long", "blank"])
def test_prepare_refuses_a_corpus_with_no_pairs_left(tmp_path, capsys, case):
    if case == "too_long":
        lines, extra = [f"{'abcdefgh' * 2}{i}\tA B" for i in range(300)], ["--max-len", "5"]
        expected = "no train pairs left: 2\\d\\d read, 0 dropped as empty, 2\\d\\d dropped as over 5"
    else:
        lines, extra = ["\t", "  \t ", "x\t", "\ty"] * 50, []
        expected = "no train pairs left: 1\\d\\d read, 1\\d\\d dropped as empty, 0 dropped"
    assert _prepare_tsv(tmp_path, "t.tsv", lines, *extra) == 2
    import re
    assert re.search(expected, capsys.readouterr().err)
    assert not (tmp_path / "d").exists() and _leftovers(tmp_path) == []


def test_prepare_refuses_an_empty_dev_split(tmp_path, capsys):
    # 12 pairs: the 5 % hash split gives this corpus no dev pair.
    words = [f"w{i}" for i in range(40)]
    words = [w for w in words if hash_split(w) == "train"][:10] + \
            [w for w in words if hash_split(w) == "test"][:2]
    assert _prepare_tsv(tmp_path, "t.tsv", [f"{w}\tW" for w in words]) == 2
    err = capsys.readouterr().err
    assert "no dev pairs left: 0 read" in err and "give --dev and --test" in err
    assert not (tmp_path / "d").exists() and _leftovers(tmp_path) == []
    empty = tmp_path / "empty.tsv"
    empty.write_text("")
    assert main(["prepare", "--train", str(tmp_path / "t.tsv"), "--dev", str(empty), "--test",
                 str(tmp_path / "t.tsv"), "--out", str(tmp_path / "d"),
                 "--src-tokenizer", "char"]) == 2
    assert "no dev pairs left" in capsys.readouterr().err


def test_empty_outputs_are_not_scored_as_perfect():
    from encdec.metrics import g2p_scores, score

    with pytest.raises(ValueError, match="nothing to score"):
        g2p_scores([], [])
    for metric in ("g2p", "text"):
        with pytest.raises(ValueError, match="nothing to score"):
            score(metric, [], [])


def test_training_and_evaluation_refuse_an_empty_split(tiny_data, tiny_run, tmp_path, capsys):
    import shutil

    from conftest import write_config

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "dev.eval.jsonl").write_text("")  # a data directory from before the check
    cfg = write_config(tmp_path / "c.yaml", data, tmp_path / "run")
    assert main(["train", str(cfg)]) == 2
    assert "the dev split is empty" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_run), "--split", "dev", "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "split 'dev' has no inputs" in err and "WER" not in err


def test_out_never_replaces_a_directory_that_is_not_a_data_directory(tmp_path, capsys):
    mine = tmp_path / "d"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    lines = [f"w{i}\tW {i}" for i in range(400)]
    assert _prepare_tsv(tmp_path, "t.tsv", lines) == 2
    assert "is not an encdec data directory" in capsys.readouterr().err
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert _prepare_tsv(tmp_path, "t.tsv", lines) == 2  # still refused
    # A data directory is replaced; an empty directory is used.
    (mine / "thesis.tex").unlink()
    assert _prepare_tsv(tmp_path, "t.tsv", lines) == 0
    assert _prepare_tsv(tmp_path, "t.tsv", lines[:300]) == 0
    assert json.loads((mine / "meta.json").read_text())["splits"]["train"]["input_pairs"] < 300
    assert json.loads((mine / "meta.json").read_text())["options"]["max_len"] == 256
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert main(["prepare", "--train", str(tmp_path / "t.tsv"), "--out", str(other),
                 "--src-tokenizer", "char", "--force"]) == 0  # --force replaces it
    assert not (other / "keep.txt").exists() and _leftovers(tmp_path) == []
    # built in a temporary directory, it still gets the usual permissions (not mkdtemp's 0700)
    import os
    umask = os.umask(0)
    os.umask(umask)
    assert (mine.stat().st_mode & 0o777) == 0o777 & ~umask


def test_sentencepiece_failures_are_data_errors_naming_the_model(tmp_path, monkeypatch, capsys):
    import errno

    import sentencepiece as spm

    with pytest.raises(DataError, match=r"nowhere/spm\.model failed .*No such file"):
        SentencePieceTokenizer.train(["a b c"] * 10, tmp_path / "nowhere" / "spm", 50)

    def disk_full(**kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", disk_full)
    lines = [f"w{i}\tW {i}" for i in range(400)]
    (tmp_path / "t.tsv").write_text("".join(line + "\n" for line in lines))
    assert main(["prepare", "--train", str(tmp_path / "t.tsv"), "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "could not write the SentencePiece model" in err and "No space left" in err
    assert "MiB free" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists() and _leftovers(tmp_path) == []
