"""Translation features: Bible recipes on the real SWORD modules, subwords with a joint vocabulary,
checkpoint averaging, long and unknown inputs, and order preservation when translating."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_pairs, needs_system, write_config, write_tsv
from encdec.cli import main
from encdec.data.prepare import prepare
from encdec.data.recipes import (SWORD_PACKAGES, Corpus, bible_en_es, bible_en_es_spoken,
                                 bible_kjv_web, bible_split, clean_osis, sword_installed)
from encdec.decoding.texts import split_pieces
from encdec.translate import Translator

ROOT = Path(__file__).resolve().parents[1]


def _missing_sword(*versions):
    return [SWORD_PACKAGES[v] for v in versions if not sword_installed(v)]


needs_kjv_sparv = needs_system(_missing_sword("kjv", "rv1909"), "the bible-en-es recipe")
needs_kjv_web = needs_system(_missing_sword("kjv", "web"), "the bible-kjv-web recipe")


def test_clean_osis_removes_markup_notes_and_paragraph_signs():
    raw = ('<div type="x-milestone" subType="x-preverse" sID="pv1"/><title canonical="true" '
           'type="psalm">A <w lemma="strong:H4210">Psalm</w> of David.</title> \u00b6 '
           '<w lemma="strong:H0430">God</w><note placement="foot"><reference type="annotateRef">'
           '1:1 </reference>The Hebrew word is \u201cElohim\u201d.</note><w>created</w> '
           '<transChange type="added">was</transChange> the <w>earth</w><note>x</note>. '
           '<title>BETH.</title><l level="1" sID="a"/>Line one<l eID="a"/><l sID="b"/>two &amp; '
           '<divineName>Lord</divineName>.<div eID="gen3" type="x-p"/>')
    assert clean_osis(raw) == ("A Psalm of David. God created was the earth. Line one two & "
                               "Lord.")
    assert clean_osis('<div type="x-p"/> ') == ""


def test_bible_split_takes_whole_chapters_deterministically():
    refs = [(book, c, v) for book in ("Gen", "Exod") for c in range(1, 31) for v in range(1, 21)]
    assign = bible_split(refs, dev_verses=100, test_verses=100)
    assert assign == bible_split(list(reversed(refs)), dev_verses=100, test_verses=100)
    by_chapter = {}
    for (book, c, _), split in assign.items():
        by_chapter.setdefault((book, c), set()).add(split)
    assert all(len(s) == 1 for s in by_chapter.values())  # never a chapter in two splits
    counts = {s: sum(1 for v in assign.values() if v == s) for s in ("train", "dev", "test")}
    assert counts == {"train": 1000, "dev": 100, "test": 100}


@needs_kjv_sparv
def test_bible_en_es_on_real_modules():
    logs = []
    corpus = bible_en_es(books=["Ruth", "3John"], dev_verses=20, test_verses=20, log=logs.append)
    pairs = [p for split in corpus.splits.values() for p in split]
    assert len(pairs) == 85 + 14  # Ruth has 85 verses, 3 John 14 in the KJV versification
    assert corpus.skipped == {"only_in_kjv": 0, "only_in_rv1909": 0, "in_renumbered_chapters": 0}
    assert "99 aligned verses" in logs[0]
    src = dict(corpus.splits["train"] + corpus.splits["dev"] + corpus.splits["test"])
    assert any(s.startswith("The elder unto the wellbeloved Gaius") for s in src)
    assert src["The elder unto the wellbeloved Gaius, whom I love in the truth."] == (
        "EL anciano al muy amado Gaio, al cual yo amo en verdad.")
    for s, t in pairs:
        assert s and t and "<" not in s + t and "\u00b6" not in s + t and "  " not in s + t
    assert len(corpus.splits["test"]) >= 20 and len(corpus.splits["dev"]) >= 20


@needs_kjv_sparv
def test_bible_en_es_spoken_writes_the_english_as_the_speech_transcripts_do():
    from encdec.data.speech import normalize_transcript, plan_bible_speech

    kw = dict(books=["Ruth", "3John"], dev_verses=20, test_verses=20, log=lambda *a: None)
    printed, spoken = bible_en_es(**kw), bible_en_es_spoken(**kw)
    assert spoken.skipped == printed.skipped and spoken.src_tokenizer == printed.src_tokenizer
    for split, pairs in printed.splits.items():  # the same verses, split and Spanish side
        assert [t for _, t in spoken.splits[split]] == [t for _, t in pairs]
    src = dict(spoken.splits["train"] + spoken.splits["dev"] + spoken.splits["test"])
    assert src["the elder unto the wellbeloved gaius whom i love in the truth"] == (
        "EL anciano al muy amado Gaio, al cual yo amo en verdad.")
    for s, _ in spoken.splits["train"]:
        assert s and s == s.lower() and not set(s) - set("abcdefghijklmnopqrstuvwxyz' ")
    # each source is the transcript bible-speech gives the same verse
    plan = plan_bible_speech(train_hours=0.01, books=["Ruth", "3John"], split_verses=(20, 20),
                             log=lambda *a: None)
    by_es = {t: s for pairs in spoken.splits.values() for s, t in pairs}
    assert plan and all(by_es[u.es] == normalize_transcript(u.text) for u in plan)


@needs_kjv_sparv
def test_bible_en_es_leaves_out_chapters_numbered_differently():
    # The Reina-Valera has no Jonah 1:17: it is its 2:1, so its chapter 2 is one verse ahead.
    logs = []
    corpus = bible_en_es(books=["Jonah"], dev_verses=0, test_verses=0, log=logs.append)
    assert corpus.skipped == {"only_in_kjv": 1, "only_in_rv1909": 0, "in_renumbered_chapters": 26}
    assert "in 2 chapters" in logs[0]
    train = dict(corpus.splits["train"])
    assert len(train) == 48 - 1 - 26  # Jonah 3 and 4 remain
    assert train["And the word of the LORD came unto Jonah the second time, saying,"].startswith(
        "Y FUÉ palabra de Jehová segunda vez á Jonás")


@needs_kjv_web
def test_bible_kjv_web_on_real_modules():
    corpus = bible_kjv_web(books=["3John"], dev_verses=0, test_verses=0, log=lambda *a: None)
    assert corpus.skipped == {"only_in_kjv": 0, "only_in_web": 0, "in_renumbered_chapters": 0}
    train = dict(corpus.splits["train"])
    assert len(train) == 14
    assert train["Beloved, I wish above all things that thou mayest prosper and be in health, "
                 "even as thy soul prospereth."].startswith("Beloved, I pray that you may prosper")


@needs_kjv_sparv
def test_bible_recipe_prepares_joint_subwords_and_is_cached(tmp_path, monkeypatch, capsys):
    from encdec.data import recipes

    small = recipes.Recipe(lambda: bible_en_es(books=["Ruth"], dev_verses=10, test_verses=10,
                                               log=lambda *a: None),
                           dict(recipes.RECIPES["bible-en-es"].options, vocab_size=300))
    monkeypatch.setitem(recipes.RECIPES, "bible-en-es", small)
    out = tmp_path / "bible"
    assert main(["prepare", "bible-en-es", "--out", str(out)]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["joint_vocab"] and meta["src_tokenizer"] == meta["tgt_tokenizer"]
    assert meta["src_tokenizer"]["kind"] == "sentencepiece"
    assert (out / "src.vocab").read_text() == (out / "tgt.vocab").read_text()
    assert meta["skipped"] == {"only_in_kjv": 0, "only_in_rv1909": 0, "in_renumbered_chapters": 0}
    assert meta["options"]["vocab_size"] == 300
    capsys.readouterr()
    assert main(["prepare", "bible-en-es", "--out", str(out)]) == 0
    assert "already prepared" in capsys.readouterr().out
    # A different option is a different preparation.
    assert main(["prepare", "bible-en-es", "--out", str(out), "--vocab-size", "280"]) == 0
    assert json.loads((out / "meta.json").read_text())["options"]["vocab_size"] == 280


@pytest.fixture(scope="module")
def subword_run(tmp_path_factory):
    """A tiny run on a joint SentencePiece vocabulary with shared embeddings."""
    root = tmp_path_factory.mktemp("subword")
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    import random
    rng = random.Random(0)
    pairs = []
    for _ in range(500):
        s = [rng.choice(words) for _ in range(rng.randint(2, 5))]
        pairs.append((" ".join(s), " ".join(reversed(s))))
    data = root / "data"
    corpus = Corpus({"train": pairs[:440], "dev": pairs[440:470], "test": pairs[470:]},
                    {"kind": "sentencepiece"}, {"kind": "sentencepiece"})
    prepare(corpus, data, vocab_size=40, joint_vocab=True, log=lambda *a: None)
    cfg = write_config(root / "cfg.yaml", data, root / "run", max_steps=300, valid_every=60,
                       keep_checkpoints=5)
    text = cfg.read_text().replace("model:\n", "model:\n  share_embeddings: true\n")
    cfg.write_text(text)
    assert main(["train", str(cfg)]) == 0
    return root / "run"


def test_shared_embeddings_are_one_tensor(subword_run):
    tr = Translator.from_run(subword_run)
    params = dict(tr.model.named_parameters())
    shared = [p for p in tr.model.parameters() if p.dim() == 2 and p.shape[0] == len(tr.assets.src_vocab)]
    assert len(shared) == 1, list(params)  # source, target and output embeddings: one tensor
    out = tr.translate(["alpha beta gamma"], beam_size=1)[0]
    assert "\u2581" not in out  # detokenized


def test_average_equals_mean_of_weights(subword_run, capsys):
    steps = sorted((subword_run / "checkpoints").glob("step-*"))
    assert len(steps) >= 3
    assert main(["average", str(subword_run), "--last", "3"]) == 0
    assert "avg-last3" in capsys.readouterr().out
    avg = load_file(str(subword_run / "checkpoints" / "avg-last3" / "model.safetensors"))
    parts = [load_file(str(p / "model.safetensors")) for p in steps[-3:]]
    assert set(avg) == set(parts[0])
    for key, value in avg.items():
        torch.testing.assert_close(value, sum(p[key] for p in parts) / 3)
    # Usable like any checkpoint.
    tr = Translator.from_run(subword_run, "avg-last3")
    assert len(tr.translate(["alpha beta"], beam_size=2)) == 1
    # Asking for more than the run kept is a clear error.
    assert main(["average", str(subword_run), "--last", "99"]) == 2
    assert "keep_checkpoints" in capsys.readouterr().err


def test_split_pieces_prefers_sentence_ends():
    pieces = ["a", "b", "c.", "d", "e", "f,", "g", "h", "i", "j"]
    assert split_pieces(pieces, 4) == [["a", "b", "c."], ["d", "e", "f,"], ["g", "h", "i", "j"]]
    assert split_pieces(pieces, 20) == [pieces]
    assert split_pieces(list("abcdefg"), 3) == [["a", "b", "c"], ["d", "e", "f"], ["g"]]


def test_long_and_unknown_inputs_warn_and_keep_order(tiny_run):
    tr = Translator.from_run(tiny_run)
    warnings = []
    long_word = "abcdefgh" * 40  # 320 characters; the tiny corpus was prepared with max_len 256
    texts = ["abc", long_word, "ab\u00e9\U0001F600", "", "dcb"]
    out = tr.translate_nbest(texts, beam_size=1, need_attention=True,
                             warn=lambda i, m: warnings.append((i, m)))
    assert [len(o) for o in out] == [1] * 5
    assert out[3][0].text == ""
    assert {i for i, _ in warnings} == {1, 2}
    assert "split into 2 segments" in dict(warnings)[1]
    assert "outside the vocabulary" in dict(warnings)[2] and "\U0001F600" in dict(warnings)[2]
    joined = out[1][0]
    parts = tr.translate_nbest([long_word[:256], long_word[256:]], beam_size=1)
    assert joined.tokens == parts[0][0].tokens + parts[1][0].tokens
    assert joined.attention.shape == (len(joined.tokens) + 1, 320)
    # Same answers one at a time as in one sorted batch.
    alone = [tr.translate([t], beam_size=1)[0] for t in texts]
    assert [o[0].text for o in out] == alone
    truncated = tr.translate_nbest([long_word], beam_size=1, long_inputs="truncate")[0][0]
    assert truncated.tokens == parts[0][0].tokens


def test_cli_streams_stdin_in_order(tiny_run, tmp_path):
    words = [s for s, _ in make_pairs(300, 7)]
    words[5] = ""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-m", "encdec.cli", "translate", str(tiny_run),
                          "--beam", "1"], input="".join(w + "\n" for w in words),
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.split("\n")[:-1]
    assert len(lines) == 300 and lines[5] == ""
    expected = Translator.from_run(tiny_run).translate(words, beam_size=1)
    assert lines == expected
    # A file: progress bar and rate on stderr, outputs in order in the output file.
    write_tsv(tmp_path / "in.txt", [(w, "") for w in words[:50]])
    (tmp_path / "in.txt").write_text("".join(w + "\n" for w in words[:50]))
    res = subprocess.run([sys.executable, "-m", "encdec.cli", "translate", str(tiny_run), "--beam",
                          "1", "-i", str(tmp_path / "in.txt"), "-o", str(tmp_path / "out.txt")],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert "50/50" in res.stderr and "lines/s" in res.stderr
    assert (tmp_path / "out.txt").read_text().split("\n")[:-1] == expected[:50]


def test_cli_stops_at_invalid_utf8_on_stdin_naming_the_line(tiny_run):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    good = [f"{w}\n".encode() for w in ("abc", "cab", "dcba")]
    res = subprocess.run([sys.executable, "-m", "encdec.cli", "translate", str(tiny_run),
                          "--beam", "1"], input=b"".join(good) + b"ab\xff\xfe\nabc\n",
                         capture_output=True, env=env)
    err = res.stderr.decode()
    assert res.returncode == 2, err
    assert "<stdin>:4: invalid UTF-8 at byte 3" in err and "Traceback" not in err
    expected = Translator.from_run(tiny_run).translate(["abc", "cab", "dcba"], beam_size=1)
    assert res.stdout.decode().splitlines() == expected  # the lines before it are answered


def test_average_never_overwrites_a_checkpoint_it_did_not_write(subword_run, capsys):
    step = sorted((subword_run / "checkpoints").glob("step-*"))[-1]
    before = (step / "model.safetensors").read_bytes()
    for name in (step.name, "step-9999999", "last", "../elsewhere", ".hidden"):
        assert main(["average", str(subword_run), "--last", "2", "--name", name]) == 2
        assert "plain directory name" in capsys.readouterr().err
    assert (step / "model.safetensors").read_bytes() == before
    mine = subword_run / "checkpoints" / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["average", str(subword_run), "--last", "2", "--name", "mine"]) == 2
    assert "not an averaged checkpoint" in capsys.readouterr().err
    assert (mine / "notes.txt").read_text() == "keep"
    assert main(["average", str(subword_run), "--last", "2", "--name", "mine", "--force"]) == 0
    assert not (mine / "notes.txt").exists() and (mine / "averaged.json").exists()
    assert main(["average", str(subword_run), "--last", "3", "--name", "mine"]) == 0  # an average


def test_average_accumulates_in_float64(tmp_path):
    """1e8, 1 and -1e8: a float32 running sum loses the 1 (1e8 + 1 rounds to 1e8) and gives 0;
    the float64 mean is 1/3. Each tensor keeps its dtype."""
    from safetensors.torch import save_file

    from encdec.checkpoint import average_checkpoints

    values = [1e8, 1.0, -1e8]
    for step, v in enumerate(values, 1):
        d = tmp_path / "checkpoints" / f"step-{step:07d}"
        d.mkdir(parents=True)
        save_file({"w": torch.full((3,), v, dtype=torch.float32),
                   "h": torch.full((2,), v / 1e8, dtype=torch.float16)}, str(d / "model.safetensors"))
    out = load_file(str(average_checkpoints(tmp_path, 3) / "model.safetensors"))
    assert out["w"].dtype == torch.float32 and out["h"].dtype == torch.float16
    torch.testing.assert_close(out["w"], torch.full((3,), 1 / 3, dtype=torch.float32), rtol=0, atol=0)
    torch.testing.assert_close(out["h"], torch.full((2,), 1e-8 / 3, dtype=torch.float16),
                               rtol=0, atol=0)
