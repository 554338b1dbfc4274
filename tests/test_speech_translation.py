"""Speech translation foundations on tone words (each letter a tone; see conftest): the target is
a "Spanish" word per letter, the transcript the letters. Three-field preparation (audio lists
and bible-speech-es from a bible-speech-like directory), the auxiliary CTC loss (its gradient
reaches the encoder only; the total is the sum of the terms), train.init_from (exactly the
named parameters are copied; a mismatch is refused by name), and prepare -> train -> evaluate
(BLEU/chrF per voice group) through the CLI."""

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
import soundfile
import torch

from conftest import TINY_SPEECH_MODEL, tone_word, write_speech_config, write_tsv
from encdec.cli import main
from encdec.config import Config, ConfigError, ModelConfig
from encdec.data.corpus import DataError
from encdec.data.utterances import (AudioFront, SpeechBatch, UtteranceSplit, collate_speech,
                                    prepare_audio_list)

SPANISH = {"a": "dios", "b": "tierra", "c": "cielo", "d": "luz", "e": "agua", "f": "dijo"}
ST_MODEL = {"aux_ctc_weight": 0.3}


def _words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdef") for _ in range(rng.randint(2, 4))) for _ in range(n)]


def write_st_list(folder: Path, name: str, n: int, seed: int, jsonl: bool = False) -> Path:
    """n tone words as WAV files and their list: AUDIO<TAB>SPANISH<TAB>LETTERS lines, or (jsonl)
    objects with a "transcript" and alternating seen/unseen groups."""
    (folder / name).mkdir(parents=True, exist_ok=True)
    lines = []
    for i, word in enumerate(_words(n, seed)):
        rel = f"{name}/{i:03d}.wav"
        soundfile.write(str(folder / rel), tone_word(word), 16000)
        text, transcript = " ".join(SPANISH[ch] for ch in word), " ".join(word)
        if jsonl:
            lines.append(json.dumps({"audio": rel, "text": text, "transcript": transcript,
                                     "group": ("seen", "unseen")[i % 2], "voice": f"v{i % 2}"}))
        else:
            lines.append(f"{rel}\t{text}\t{transcript}")
    path = folder / f"{name}.{'jsonl' if jsonl else 'tsv'}"
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def st_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_st")
    train, dev = (write_st_list(root, s, n, seed) for s, n, seed in (("train", 120, 1),
                                                                       ("dev", 10, 2)))
    test = write_st_list(root, "test", 12, 3, jsonl=True)
    out = root / "data"
    assert main(["prepare", "--train", str(train), "--dev", str(dev), "--test", str(test),
                 "--out", str(out), "--tgt-tokenizer", "whitespace"]) == 0
    return out


@pytest.fixture(scope="module")
def st_run(st_data, tmp_path_factory) -> Path:
    """A few steps of speech translation with the auxiliary CTC loss, through the CLI."""
    root = tmp_path_factory.mktemp("st_run")
    cfg = write_speech_config(root / "st.yaml", st_data, root / "run", model=ST_MODEL,
                              max_steps=8, valid_every=8)
    assert main(["train", str(cfg)]) == 0
    return root / "run"


# ---- preparation ---------------------------------------------------------------------------
def test_audio_lists_with_transcripts_are_binarized_on_their_own(st_data):
    from encdec.data.tokenizers import tokenizer_from_spec
    from encdec.data.vocab import Vocab

    meta = json.loads((st_data / "meta.json").read_text())
    assert meta["metric"] == "text"  # a list with transcripts is translation: BLEU/chrF
    assert meta["transcript_tokenizer"]["model"] == "spm.transcript.model"
    assert meta["tgt_vocab_size"] == 4 + len(SPANISH)  # specials + the whitespace words
    vocab = Vocab.load(st_data / "transcript.vocab")
    assert meta["transcript_vocab_size"] == len(vocab)
    tokenizer = tokenizer_from_spec(meta["transcript_tokenizer"], st_data)
    for split in ("train", "dev", "test"):
        data = UtteranceSplit(st_data, split)
        assert data.has_transcripts
        for i in (0, len(data) - 1):
            entry = data.entries[i]
            assert tokenizer.decode(vocab.decode(data.transcript(i))) == entry["transcript"]
            assert entry["text"] == " ".join(SPANISH[ch] for ch in entry["transcript"].split())
    assert {e["group"] for e in UtteranceSplit(st_data, "test").entries} == {"seen", "unseen"}
    # the batch carries the transcript ids, PAD-padded
    data = UtteranceSplit(st_data, "dev")
    batch = collate_speech(data, [0, 1, 2], AudioFront.load(st_data, meta))
    for b in range(3):
        row = batch.src_text[b]
        assert row[row.ne(0)].tolist() == data.transcript(b).tolist()
    assert batch.to("cpu").src_text is not None


def test_transcripts_must_be_given_for_every_utterance_or_none(tmp_path):
    lines = write_st_list(tmp_path, "train", 12, 4).read_text().splitlines()
    mixed = tmp_path / "mixed.tsv"
    mixed.write_text("\n".join(lines[:5] + ["\t".join(lines[5].split("\t")[:2])] + lines[6:])
                     + "\n")
    with pytest.raises(DataError, match=r"'mixed-6' has no 'transcript'"):
        prepare_audio_list(tmp_path / "out", {"train": str(mixed), "dev": str(mixed),
                                              "test": str(mixed)}, log=lambda *a: None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"audio": "train/000.wav", "text": "dios", "transcript": 3}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*\"transcript\" string"):
        prepare_audio_list(tmp_path / "out", {"train": str(bad)}, log=lambda *a: None)


def _bible_speech_like(root: Path) -> Path:
    """A small directory shaped like `encdec prepare bible-speech`'s: tone-word FLAC files,
    manifests with the Spanish verse, a real split without it, statistics and meta."""
    from encdec.data.utterances import finish_speech_dir

    verses = [("in the beginning god created the heaven and the earth",
               "EN el principio crió Dios los cielos y la tierra."),
              ("and god said let there be light and there was light",
               "Y dijo Dios: Sea la luz: y fué la luz."),
              ("and god saw the light that it was good",
               "Y vió Dios que la luz era buena."),
              ("and the evening and the morning were the first day",
               "Y fué la tarde y la mañana un día.")]
    out = root / "bible-speech"
    manifests = {"train": [], "dev": [], "test": [], "real": []}
    plan = [("train", v, "seen") for v in range(4)] * 3 + [("dev", 0, "seen"), ("test", 1, "seen"),
                                                         ("test", 1, "unseen"), ("real", 2, "real")]
    for i, (split, v, group) in enumerate(plan):
        rel = f"audio/{split}/{i:02d}.flac"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        wave = tone_word(_words(1, i)[0])
        soundfile.write(str(out / rel), wave, 16000, format="FLAC")
        en, es = verses[v]
        manifests[split].append({
            "id": f"1.1.{v + 1}.voice{i}", "audio": rel, "duration": round(len(wave) / 16000, 3),
            "text": en, "voice": group if group == "real" else f"voice{i % 3}", "group": group,
            "ref": "" if split == "real" else f"1.1.{v + 1}", "es": "" if split == "real" else es})
    for split, m in manifests.items():
        (out / f"{split}.manifest.jsonl").write_text("".join(json.dumps(e) + "\n" for e in m))
    targets = finish_speech_dir(out, manifests, vocab_size=60, log=lambda *a: None)
    meta = {"format": 1, "name": "bible-speech", "modality": "speech", "sample_rate": 16000,
            **targets, "utterances": {s: len(m) for s, m in manifests.items()}}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_bible_speech_es_reuses_the_audio_with_spanish_targets(tmp_path, capsys):
    from encdec.data.utterances import STATS_FILE, read_manifest

    speech = _bible_speech_like(tmp_path)
    out = tmp_path / "bible-speech-es"
    args = ["prepare", "bible-speech-es", "--speech-dir", str(speech), "--out", str(out),
            "--vocab-size", "50"]
    assert main(args) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["name"] == "bible-speech-es" and meta["metric"] == "text"
    assert meta["utterances"] == {"train": 12, "dev": 1, "test": 2}  # no real split
    assert not (out / "real.manifest.jsonl").exists()
    assert meta["tgt_tokenizer"]["model"] == "spm.tgt.model"
    assert meta["transcript_tokenizer"]["model"] == "spm.transcript.model"
    assert meta["transcript_vocab_size"] > 4
    for name in ("spm.transcript.model", "transcript.vocab", "test.transcript.tokens.npy",
                 "test.transcript.offsets.npy", "test.tgt.tokens.npy"):
        assert (out / name).exists(), name
    assert (out / STATS_FILE).read_bytes() == (speech / STATS_FILE).read_bytes()
    for split in ("train", "dev", "test"):
        source = read_manifest(speech, split)
        data = UtteranceSplit(out, split)
        assert len(data) == len(source) and data.has_transcripts
        for i, (new, old) in enumerate(zip(data.entries, source)):
            assert new["audio"] == f"../bible-speech/{old['audio']}"
            assert data.audio_path(i).samefile(speech / old["audio"])
            assert new["text"] == old["es"] and new["transcript"] == old["text"]
            assert {k: new[k] for k in ("id", "duration", "voice", "group", "ref")} == \
                {k: old[k] for k in ("id", "duration", "voice", "group", "ref")}
            assert "es" not in new
    assert [e["group"] for e in UtteranceSplit(out, "test").entries] == ["seen", "unseen"]
    # the audio is read through the relative paths
    data = UtteranceSplit(out, "test")
    batch = collate_speech(data, [0, 1], AudioFront.load(out, meta))
    assert batch.src_feats.shape[0] == 2 and batch.src_text.shape[0] == 2
    capsys.readouterr()
    assert main(args) == 0 and "already prepared" in capsys.readouterr().out
    assert main(["prepare", "bible-speech-es", "--speech-dir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "es2")]) == 2
    assert "run `encdec prepare bible-speech` first" in capsys.readouterr().err


# ---- the auxiliary CTC loss ----------------------------------------------------------------
def _st_model(aux_ctc_weight=0.5, seed=0):
    from encdec.models import build_model

    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY_SPEECH_MODEL, "aux_ctc_weight": aux_ctc_weight})
    return build_model(cfg, 20, 9, transcript_vocab_size=7)


def _st_batch(seed=1) -> SpeechBatch:
    from encdec.data.dataset import pad, teacher_forcing

    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([60, 44, 52])
    feats = torch.randn(3, 60, 20, generator=g)
    for b, n in enumerate(lengths):
        feats[b, n:] = 0.0
    tgts = [[4, 5, 6, 7], [8, 4], [5, 5, 6]]
    transcripts = [[4, 5, 6], [3, 4, 4, 6], [6]]
    return SpeechBatch(feats, lengths, *teacher_forcing(tgts), 9 + 3, pad(transcripts))


def test_aux_ctc_gradient_reaches_the_encoder_only():
    from encdec.losses import aux_ctc_loss

    model = _st_model()
    batch = _st_batch()
    aux = aux_ctc_loss(model, model.encode(batch.src_feats, batch.src_lengths), batch)
    aux.backward()
    parts = {"front": ("front.",), "encoder": ("encoder.", "enc_norm."),
             "aux_ctc": ("aux_ctc.",), "ctc": ("ctc.",),
             "decoder": ("tgt_embed.", "decoder.", "dec_norm.", "output.")}
    grads = {part: [p.grad for n, p in model.named_parameters() if n.startswith(prefixes)]
             for part, prefixes in parts.items()}
    for part in ("front", "encoder", "aux_ctc"):
        assert all(g is not None and g.abs().sum() > 0 for g in grads[part]), part
    for part in ("ctc", "decoder"):
        assert grads[part] and all(g is None for g in grads[part]), part


def test_aux_ctc_term_adds_to_the_joint_loss_with_its_weight():
    from encdec.losses import aux_ctc_loss, ctc_attention_loss

    model = _st_model(aux_ctc_weight=0.5).eval()
    batch = _st_batch()
    with torch.no_grad():
        total, nll = ctc_attention_loss(model, batch, 0.1)
        aux = aux_ctc_loss(model, model.encode(batch.src_feats, batch.src_lengths), batch)
        model.cfg = dataclasses.replace(model.cfg, aux_ctc_weight=0.0)
        base, base_nll = ctc_attention_loss(model, batch, 0.1)
    assert float(aux) > 0
    assert float(total) == pytest.approx(float(base) + 0.5 * float(aux), rel=1e-6)
    assert float(nll) == float(base_nll)  # the NLL stays the decoder's
    with pytest.raises(DataError, match="no transcripts"):
        model.cfg = dataclasses.replace(model.cfg, aux_ctc_weight=0.5)
        ctc_attention_loss(model, dataclasses.replace(batch, src_text=None), 0.1)


def test_aux_ctc_needs_data_with_transcripts(tiny_speech_data):
    from encdec.models import model_for_data

    meta = json.loads((tiny_speech_data / "meta.json").read_text())  # ASR: no transcripts
    cfg = ModelConfig(**{**TINY_SPEECH_MODEL, **ST_MODEL})
    with pytest.raises(ConfigError, match="model.aux_ctc_weight=0.3 needs source-language"):
        model_for_data(cfg, meta)
    with pytest.raises(ConfigError, match="model.aux_ctc_weight"):
        Config.from_dict({"model": {"aux_ctc_weight": 0.3}})  # a text model


# ---- train.init_from -----------------------------------------------------------------------
def _trainer(st_data, run_dir: Path, model=None, **train):
    from encdec.train import Trainer

    cfg = write_speech_config(run_dir.with_suffix(".yaml"), st_data, run_dir,
                              model={**ST_MODEL, **(model or {})}, **train)
    logs = []
    return Trainer(Config.load(cfg), log=logs.append, progress=False), logs


def test_init_from_copies_exactly_the_named_parts(st_data, st_run, tmp_path):
    from safetensors.torch import load_file

    from encdec.checkpoint import resolve
    from encdec.models import model_for_data

    source = load_file(str(resolve(st_run, "best") / "model.safetensors"))
    trainer, logs = _trainer(st_data, tmp_path / "init", seed=7, init_from=str(st_run),
                             init_parts=["front", "encoder"])
    torch.manual_seed(7)  # the weights the run would start from without init_from
    fresh = dict(model_for_data(trainer.cfg.model, trainer.assets.meta).named_parameters())
    copied = 0
    for name, param in trainer.model.named_parameters():
        if name.startswith(("front.", "encoder.", "enc_norm.")):
            torch.testing.assert_close(param.detach(), source[name], rtol=0, atol=0)
            copied += 1
        else:
            torch.testing.assert_close(param.detach(), fresh[name].detach(), rtol=0, atol=0)
    assert copied > 10 and any(f"copied {copied} tensors" in line for line in logs), logs
    # not vacuous: the source's encoder is not what this seed would have drawn
    assert any(not torch.equal(fresh[n].detach(), source[n]) for n in fresh
               if n.startswith("encoder."))


def test_init_from_refuses_a_mismatch_by_name(st_data, st_run, tmp_path, capsys):
    from encdec.models import model_for_data
    from encdec.train import copy_parts

    meta = json.loads((st_data / "meta.json").read_text())
    wider = ModelConfig(**{**TINY_SPEECH_MODEL, **ST_MODEL, "ffn_dim": 48})
    source_cfg = Config.load(st_run / "config.yaml").model
    here = dict(model_for_data(wider, meta).named_parameters())
    there = dict(model_for_data(source_cfg, meta).named_parameters())
    name = next(n for n in here if n.startswith("encoder.") and here[n].shape != there[n].shape)
    with pytest.raises(ConfigError, match=re.escape(f"{name} has shape {tuple(there[name].shape)} "
                                                   f"there but {tuple(here[name].shape)} here")):
        copy_parts(model_for_data(wider, meta), st_run, ("encoder",))
    deeper = ModelConfig(**{**TINY_SPEECH_MODEL, **ST_MODEL, "enc_layers": 3})
    with pytest.raises(ConfigError, match=r"its model has no parameter encoder\.2\."):
        copy_parts(model_for_data(deeper, meta), st_run, ("encoder",))
    shallower = ModelConfig(**{**TINY_SPEECH_MODEL, **ST_MODEL, "enc_layers": 1})
    with pytest.raises(ConfigError, match=r"its parameter encoder\.1\..* has no place"):
        copy_parts(model_for_data(shallower, meta), st_run, ("encoder",))
    # through the CLI: the key, the parameter and both shapes
    cfg = write_speech_config(tmp_path / "c.yaml", st_data, tmp_path / "run",
                              model={**ST_MODEL, "ffn_dim": 48},
                              init_from=str(st_run), init_parts=["encoder"])
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "train.init_from" in err and name in err and str(tuple(here[name].shape)) in err
    with pytest.raises(ConfigError, match="train.init_parts"):
        Config.from_dict({"model": {"arch": "speech"}, "train": {"init_parts": ["encoders"]}})


# ---- end to end ----------------------------------------------------------------------------
def test_prepare_train_evaluate_prints_bleu_per_group(st_run, capsys):
    records = [json.loads(line) for line in (st_run / "metrics.jsonl").read_text().splitlines()]
    assert any("valid_bleu" in r for r in records)  # validation scores by the data's metric
    assert (st_run / "data" / "transcript.vocab").exists()
    assert main(["evaluate", str(st_run), "--split", "test", "--method", "greedy"]) == 0
    out = capsys.readouterr().out
    assert "BLEU" in out and "chrF" in out and "nrefs:1" in out and "real-time factor" in out
    lines = out.splitlines()
    assert any(line.split()[:1] == ["seen"] and "BLEU" in line for line in lines), out
    assert any(line.split()[:1] == ["unseen"] and "BLEU" in line for line in lines), out
    result = json.loads((st_run / "eval" / "test-greedy.json").read_text())
    assert result["metric"] == "text" and set(result["groups"]) == {"seen", "unseen"}
    assert {"bleu", "chrf", "bleu_signature"} <= set(result["groups"]["seen"])
    # per voice, each under its group: v0 speaks the seen utterances, v1 the unseen ones
    assert {v: (r["group"], r["n"]) for v, r in result["voices"].items()} == \
        {"v0": ("seen", 6), "v1": ("unseen", 6)}
    assert result["voices"]["v0"]["bleu"] == result["groups"]["seen"]["bleu"]
    at = {line.split()[0]: i for i, line in enumerate(lines) if line.split()[:1] in
          (["seen"], ["unseen"], ["v0"], ["v1"])}
    assert at["seen"] < at["v0"] < at["unseen"] < at["v1"], out


# ---- the decoder from a translation run (prepare --targets-from, train.init_decoder_from) ----
def _text_side(root: Path, speech: Path) -> Path:
    """A text data directory of English -> Spanish pairs (the bible-speech-like verses and a few
    more), SentencePiece targets."""
    from encdec.data.utterances import read_manifest

    pairs = sorted({(e["text"], e["es"]) for split in ("train", "dev", "test")
                    for e in read_manifest(speech, split)})
    extra = [("and the spirit of god moved", "Y el Espíritu de Dios se movía."),
             ("and god called the light day", "Y llamó Dios á la luz Día.")]
    train = write_tsv(root / "text-train.tsv", pairs + extra)
    held = write_tsv(root / "text-dev.tsv", extra)
    out = root / "text"
    assert main(["prepare", "--train", str(train), "--dev", str(held), "--test", str(held),
                 "--out", str(out), "--vocab-size", "70", "--spm-type", "unigram"]) == 0
    return out


def _text_run(text_data: Path, root: Path, steps: int = 4) -> Path:
    """A few steps of a text model whose decoder has the tiny speech model's shape."""
    decoder = {k: TINY_SPEECH_MODEL[k] for k in ("d_model", "n_heads", "dec_layers", "ffn_dim")}
    cfg = {"data": {"dir": str(text_data)},
           "model": {"enc_layers": 1, "dropout": 0.0, **decoder},
           "train": {"run_dir": str(root / "mt"), "max_tokens": 200, "lr": 3e-3,
                     "warmup_steps": 2, "valid_every": steps, "max_steps": steps,
                     "num_threads": 1}}
    (root / "mt.yaml").write_text(json.dumps(cfg))
    assert main(["train", str(root / "mt.yaml")]) == 0
    return root / "mt"


def test_decoder_of_a_translation_run_starts_the_speech_translation_model(tmp_path, capsys):
    from encdec.checkpoint import load_weights, resolve
    from encdec.data.tokenizers import tokenizer_from_spec
    from encdec.data.vocab import Vocab
    from encdec.models import model_for_data

    speech = _bible_speech_like(tmp_path)
    text = _text_side(tmp_path, speech)
    text_meta = json.loads((text / "meta.json").read_text())
    out = tmp_path / "es"
    assert main(["prepare", "bible-speech-es", "--speech-dir", str(speech), "--out", str(out),
                 "--targets-from", str(text)]) == 0
    assert "training tokens not in it" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["options"]["targets_from"] == str(text)
    assert (out / "tgt.vocab").read_bytes() == (text / "tgt.vocab").read_bytes()
    assert (out / "spm.tgt.model").read_bytes() == \
        (text / text_meta["tgt_tokenizer"]["model"]).read_bytes()
    assert meta["tgt_vocab_size"] == text_meta["tgt_vocab_size"]
    # the targets are the ids the text data's own tokenizer and vocabulary give
    tok = tokenizer_from_spec(text_meta["tgt_tokenizer"], text)
    vocab = Vocab.load(text / "tgt.vocab")
    data = UtteranceSplit(out, "test")
    for i, entry in enumerate(data.entries):
        assert data.tgt(i).tolist() == vocab.encode(tok.encode(entry["text"]))
    # a prepared directory with other options is not taken as done
    capsys.readouterr()
    assert main(["prepare", "bible-speech-es", "--speech-dir", str(speech), "--out", str(out),
                 "--targets-from", str(text)]) == 0
    assert "already prepared" in capsys.readouterr().out
    assert main(["prepare", "bible-speech-es", "--speech-dir", str(speech), "--out", str(out),
                 "--targets-from", str(text), "--vocab-size", "50"]) == 2
    assert "give one" in capsys.readouterr().err
    assert main(["prepare", "bible-speech", "--targets-from", str(text)]) == 2
    assert "--targets-from is an option of the bible-speech-es recipe" in capsys.readouterr().err
    assert main(["prepare", "bible-speech-es", "--speech-dir", str(speech), "--out",
                 str(tmp_path / "es-bad"), "--targets-from", str(speech)]) == 2
    assert "not a prepared text data directory" in capsys.readouterr().err

    mt = _text_run(text, tmp_path)
    mt_model = model_for_data(Config.load(mt / "config.yaml").model, text_meta)
    load_weights(mt_model, resolve(mt, "best"))
    source = mt_model.state_dict()  # every name of a tied weight
    trainer, logs = _trainer(out, tmp_path / "st", seed=5, init_decoder_from=str(mt))
    torch.manual_seed(5)  # the weights the run would start from without it
    fresh = dict(model_for_data(trainer.cfg.model, trainer.assets.meta).named_parameters())
    copied = 0
    for name, param in trainer.model.named_parameters():
        if name.startswith(("tgt_embed.", "decoder.", "dec_norm.", "output.")):
            torch.testing.assert_close(param.detach(), source[name], rtol=0, atol=0)
            copied += 1
        else:
            torch.testing.assert_close(param.detach(), fresh[name].detach(), rtol=0, atol=0)
    assert copied >= 8 and any(f"copied {copied} tensors (decoder)" in line for line in logs)
    assert any(not torch.equal(fresh[n].detach(), source[n]) for n in fresh
               if n.startswith("decoder.") and n in source)

    # data with its own target vocabulary: refused, naming the way out
    own = tmp_path / "es-own"
    assert main(["prepare", "bible-speech-es", "--speech-dir", str(speech), "--out", str(own),
                 "--vocab-size", "60"]) == 0
    with pytest.raises(ConfigError, match=r"another target vocabulary .*--targets-from"):
        _trainer(own, tmp_path / "st-own", init_decoder_from=str(mt))
    # the decoder from two places is refused; a text model cannot take it
    with pytest.raises(ConfigError, match="take decoder out of train.init_parts"):
        Config.from_dict({"model": {"arch": "speech"},
                          "train": {"init_from": "a", "init_parts": ["encoder", "decoder"],
                                    "init_decoder_from": "b"}})
    with pytest.raises(ConfigError, match="train.init_decoder_from"):
        Config.from_dict({"train": {"init_decoder_from": "b"}})


def test_distill_transcripts_gives_the_end_to_end_data_the_mt_runs_translations(tmp_path, capsys):
    """`encdec distill MT_RUN --data ST_DATA`: the text run translates each distinct training
    transcript once; the outputs become the training targets (ids in the data's vocabulary), the
    references stay beside them, dev and test are untouched, the audio is still found from
    another folder depth, and data on another target vocabulary is refused."""
    from encdec.data.assets import load_assets
    from encdec.translate import Translator

    speech = _bible_speech_like(tmp_path)
    text = _text_side(tmp_path, speech)
    es = tmp_path / "es"
    assert main(["prepare", "bible-speech-es", "--speech-dir", str(speech), "--out", str(es),
                 "--targets-from", str(text)]) == 0
    mt = _text_run(text, tmp_path, steps=60)  # long enough to write words
    out = tmp_path / "distilled" / "es-kd"  # one folder deeper: relative audio paths change
    out.parent.mkdir()
    capsys.readouterr()
    assert main(["distill", str(mt), "--data", str(es), "--out", str(out), "--beam", "2"]) == 0
    assert "distilling 4 distinct transcripts of 12 train utterances" in capsys.readouterr().out

    old, new = UtteranceSplit(es, "train"), UtteranceSplit(out, "train")
    transcripts = list(dict.fromkeys(e["transcript"] for e in old.entries))
    teacher = dict(zip(transcripts, Translator.from_run(mt).translate(transcripts, beam_size=2)))
    assets = load_assets(out)
    changed = 0
    assert len(new) == len(old) == 12
    for i, (n, o) in enumerate(zip(new.entries, old.entries)):
        want = teacher[o["transcript"]] if assets.tgt_tokenizer.encode(teacher[o["transcript"]]) \
            else o["text"]
        changed += want != o["text"]
        assert n["text"] == want and n["reference"] == o["text"]
        assert n["transcript"] == o["transcript"] and n["id"] == o["id"]
        assert new.tgt(i).tolist() == assets.tgt_vocab.encode(assets.tgt_tokenizer.encode(want))
        assert new.audio_path(i).samefile(old.audio_path(i))
        assert new.transcript(i).tolist() == old.transcript(i).tolist()
    assert changed > 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["distilled"]["targets_changed"] == changed and meta["distilled"]["sources"] == 4
    assert meta["distilled"]["decode"]["beam_size"] == 2
    import sacrebleu
    agree = meta["distilled"]["against_references"]
    texts, refs = [e["text"] for e in new.entries], [e["reference"] for e in new.entries]
    assert agree["bleu"] == round(sacrebleu.corpus_bleu(texts, [refs]).score, 2)
    assert agree["chrf"] == round(sacrebleu.corpus_chrf(texts, [refs]).score, 2)
    assert agree["length_ratio"] == round(sum(map(len, texts)) / sum(map(len, refs)), 3)
    for split in ("dev", "test"):
        a, b = UtteranceSplit(es, split), UtteranceSplit(out, split)
        assert [e["text"] for e in a.entries] == [e["text"] for e in b.entries]
        assert all(b.tgt(i).tolist() == a.tgt(i).tolist() for i in range(len(a)))
        assert all(b.audio_path(i).samefile(a.audio_path(i)) for i in range(len(a)))
    # the end-to-end model trains on it
    trainer, _ = _trainer(out, tmp_path / "st-kd", max_steps=2, valid_every=2)
    trainer.fit()
    assert (tmp_path / "st-kd" / "checkpoints" / "best").exists()

    # data on its own target vocabulary: refused, naming --targets-from
    own = tmp_path / "es-own"
    assert main(["prepare", "bible-speech-es", "--speech-dir", str(speech), "--out", str(own),
                 "--vocab-size", "60"]) == 0
    capsys.readouterr()
    assert main(["distill", str(mt), "--data", str(own), "--out", str(tmp_path / "x")]) == 2
    assert f"--targets-from {text}" in capsys.readouterr().err
    # a text data directory is not speech translation data
    assert main(["distill", str(mt), "--data", str(text), "--out", str(tmp_path / "x")]) == 2
    assert "not a speech translation data directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_distill_transcripts_refuses_a_speech_run_as_the_teacher(st_data, st_run, tmp_path,
                                                                  capsys):
    assert main(["distill", str(st_run), "--data", str(st_data), "--out",
                 str(tmp_path / "kd")]) == 2
    assert "is a speech run; the teacher of --data is a text translation run" in \
        capsys.readouterr().err
    assert not (tmp_path / "kd").exists()


# ---- benchmarks/st_compare.py: the corpus and the init runs come from the runs' configs ------
def _st_compare():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "st_compare.py"
    spec = importlib.util.spec_from_file_location("st_compare_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_st_compare_reads_the_corpus_and_init_runs_from_the_first_st_run(st_data, st_run,
                                                                        tmp_path):
    import yaml

    st_compare = _st_compare()
    # a second run trained on another corpus, from an ASR run's encoder and an MT run's decoder
    other = tmp_path / "other"
    other.mkdir()
    cfg = yaml.safe_load((st_run / "config.yaml").read_text())
    cfg["data"]["dir"] = "data/another-corpus"
    cfg["train"].update(init_from="runs/asr", init_decoder_from="runs/mt")
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))

    # the corpus the first --st run was trained on, whatever its label or checkpoint
    assert st_compare.default_data([str(st_run), str(other)]) == str(st_data)
    assert st_compare.default_data([f"e2e={st_run}@step-0000008", str(other)]) == str(st_data)
    assert st_compare.default_data([f"mt decoder={other}@best", str(st_run)]) == \
        "data/another-corpus"
    # no --st run, or one that is not a run: the recipe's corpus
    assert st_compare.default_data([]) == "data/bible-speech-es"
    assert st_compare.default_data([str(tmp_path / "missing")]) == "data/bible-speech-es"

    assert st_compare.init_runs(st_run) == []
    assert st_compare.init_runs(other) == [Path("runs/asr"), Path("runs/mt")]
