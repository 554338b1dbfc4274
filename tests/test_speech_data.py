"""The bible-speech corpus: planned voices and splits, synthesis with flite and espeak-ng,
resumable preparation, the real recordings, and transcripts normalized for scoring."""

import json
import shutil

import pytest

from conftest import needs_system
from encdec.data.recipes import SWORD_PACKAGES, sword_installed
from encdec.data.speech import (REAL_DIR, VOICES, normalize_transcript, plan_bible_speech,
                                prepare_speech)

_missing = [p for p in ("flite", "espeak-ng") if shutil.which(p) is None] + \
    [SWORD_PACKAGES[v] for v in ("kjv", "rv1909") if not sword_installed(v)] + \
    ([] if REAL_DIR.exists() else ["pocketsphinx-testdata"])
needs_speech = needs_system(_missing, "the bible-speech recipe")


def test_transcripts_are_what_is_heard():
    assert normalize_transcript("And God said, Let there be light: and there was light.") == \
        "and god said let there be light and there was light"
    assert normalize_transcript("the LORD'S house; well-favoured, (Selah) 'twas") == \
        "the lord's house well favoured selah twas"


@needs_speech
def test_plan_holds_out_voices_and_doubles_the_test_verses():
    plan = plan_bible_speech(train_hours=0.05, eval_verses=5, books=["Ruth", "Jonah"],
                             split_verses=(10, 10), log=lambda *a: None)
    assert plan == plan_bible_speech(train_hours=0.05, eval_verses=5, books=["Ruth", "Jonah"],
                                     split_verses=(10, 10), log=lambda *a: None)
    seen = {v.name for v in VOICES if v.seen}
    unseen = {v.name for v in VOICES if not v.seen}
    assert len(unseen) >= 2
    by_split = {s: [u for u in plan if u.split == s] for s in ("train", "dev", "test")}
    assert all(u.voice in seen for s in ("train", "dev") for u in by_split[s])
    test_refs = {}
    for u in by_split["test"]:
        test_refs.setdefault(u.ref, set()).add(u.voice in seen)
    assert test_refs and all(v == {True, False} for v in test_refs.values())
    train_refs = {u.ref for u in by_split["train"]}
    assert not train_refs & set(test_refs)  # whole chapters per split
    assert all(0.9 <= u.rate <= 1.1 and 0.9 <= u.pitch <= 1.1 for u in plan)


@needs_speech
def test_prepare_synthesizes_resumes_and_reports_hours(tmp_path):
    import soundfile

    from encdec.audio import read_audio

    opts = dict(train_hours=0.01, eval_verses=2, books=["Ruth", "Jonah"], split_verses=(10, 10),
                log=lambda *a: None)
    meta = prepare_speech(tmp_path / "speech", **opts)
    out = tmp_path / "speech"
    manifests = {s: [json.loads(x) for x in (out / f"{s}.manifest.jsonl").read_text().splitlines()]
                 for s in ("train", "dev", "test", "real")}
    assert {e["group"] for e in manifests["test"]} == {"seen", "unseen"}
    assert manifests["train"] and manifests["dev"]
    for e in manifests["train"] + manifests["test"]:
        info = soundfile.info(str(out / e["audio"]))
        assert info.samplerate == 16000 and info.channels == 1 and info.format == "FLAC"
        assert abs(info.duration - e["duration"]) < 0.01 and 0.5 < e["duration"] <= 12
        assert e["text"] == normalize_transcript(e["text"]) and e["es"]
    assert meta["hours"]["train"] == pytest.approx(sum(e["duration"] for e in manifests["train"]) / 3600, abs=1e-3)
    assert set(meta["hours_per_voice"]) >= {e["voice"] for e in manifests["train"]}
    # Killed half way: the files already there are kept, the missing ones made again.
    first = out / manifests["train"][0]["audio"]
    stamp = first.stat().st_mtime_ns
    (out / manifests["test"][0]["audio"]).unlink()
    again = prepare_speech(out, **opts)
    assert again["utterances"] == meta["utterances"] and first.stat().st_mtime_ns == stamp
    assert read_audio(out / manifests["test"][0]["audio"]).numel() > 8000
    assert len(manifests["real"]) == 10  # pocketsphinx-testdata: 5 LibriVox clips, 5 card names
    assert any("dashwood" in e["text"] for e in manifests["real"])


def test_cli_hours_goes_to_the_speech_recipe_only(tmp_path, monkeypatch, capsys):
    import encdec.data.speech as speech
    from encdec.cli import main

    seen = {}
    monkeypatch.setattr(speech, "prepare_speech", lambda out, **kw: seen.update(out=out, **kw))
    assert main(["prepare", "bible-speech", "--out", str(tmp_path / "s"), "--hours", "0.5"]) == 0
    assert seen == {"out": tmp_path / "s", "train_hours": 0.5, "vocab_size": 256}
    assert main(["prepare", "g2p-cmudict", "--out", str(tmp_path / "g"), "--hours", "1"]) == 2
    assert "--hours is an option of the bible-speech and bible-tts recipes" in capsys.readouterr().err
