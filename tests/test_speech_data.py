"""The bible-speech corpus: planned voices and splits, synthesis with flite and espeak-ng,
resumable preparation, the real recordings, and transcripts normalized for scoring."""

import json
from pathlib import Path

import pytest

from conftest import needs_system
from encdec.data.recipes import SWORD_PACKAGES, sword_installed
from encdec.data.speech import (REAL_DIR, VOICE_SETS, VOICES, Utterance, Voice,
                                missing_engines, normalize_transcript, plan_bible_speech,
                                prepare_speech, synthesize)

_missing = missing_engines(VOICE_SETS["wide"]) + \
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
def test_wide_voice_set_adds_training_voices_and_keeps_the_unseen_test():
    opts = dict(train_hours=0.3, eval_verses=8, books=["Ruth", "Jonah"], split_verses=(10, 10),
                log=lambda *a: None)
    standard = plan_bible_speech(**opts)
    wide = plan_bible_speech(**opts, voices=VOICE_SETS["wide"])
    extra = {v.name for v in VOICE_SETS["wide"]} - {v.name for v in VOICES}
    assert len(extra) == 5 and all(v.seen for v in VOICE_SETS["wide"] if v.name in extra)
    unseen = lambda plan: [u for u in plan if u.voice in {v.name for v in VOICES if not v.seen}]
    assert unseen(wide) == unseen(standard) and len(unseen(wide)) == 8
    train_voices = {u.voice for u in wide if u.split == "train"}
    assert extra <= train_voices and not train_voices & {u.voice for u in unseen(wide)}


def _f0(samples, rate=16000):
    """Median pitch (Hz) of the voiced 50 ms frames, by autocorrelation."""
    import numpy as np

    found = []
    for i in range(0, len(samples) - 800, 400):
        w = samples[i:i + 800]
        if np.abs(w).mean() < 0.02:
            continue
        ac = np.correlate(w, w, "full")[799:]
        found.append(rate / (rate // 400 + ac[rate // 400: rate // 60].argmax()))
    return float(np.median(found))


@needs_speech
def test_festival_voice_follows_rate_and_pitch(tmp_path):
    """The festival engine, like flite and espeak-ng, speaks at the utterance's rate and pitch:
    a slower utterance lasts longer and a higher one has a higher F0 (ked's own is ~105 Hz)."""
    import soundfile

    text = "And God said, Let there be light: and there was light."
    made = {}
    for rate, pitch in ((0.9, 1.0), (1.1, 1.0), (1.0, 0.9), (1.0, 1.4)):
        path = tmp_path / f"{rate}-{pitch}.flac"
        seconds = synthesize(Utterance("u", "train", text, "festival-ked", rate, pitch), path)
        samples, sr = soundfile.read(str(path), dtype="float32")
        assert sr == 16000 and seconds == len(samples) / sr and 2.5 < seconds < 6
        made[rate, pitch] = seconds, _f0(samples)
    assert made[1.1, 1.0][0] > 1.15 * made[0.9, 1.0][0]
    assert 85 < made[1.0, 0.9][1] < 105 and 135 < made[1.0, 1.4][1] < 160


def test_missing_engines_name_the_packages():
    assert missing_engines([Voice("x", "festival", "no_such_diphone", True, 100.0)])[-1] == \
        "festvox-kdlpc16k"
    assert missing_engines([]) == []


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
    assert seen == {"out": tmp_path / "s", "train_hours": 0.5, "vocab_size": 256,
                    "voices": "standard"}
    monkeypatch.chdir(tmp_path)  # the default directory of the wide set, relative
    assert main(["prepare", "bible-speech", "--voices", "wide", "--hours", "0.5"]) == 0
    assert seen["out"] == Path("data/bible-speech-wide") and seen["voices"] == "wide"
    assert main(["prepare", "bible-tts", "--out", str(tmp_path / "t"), "--voices", "wide"]) == 2
    assert "--voices is an option of the bible-speech recipe" in capsys.readouterr().err
    assert main(["prepare", "g2p-cmudict", "--out", str(tmp_path / "g"), "--hours", "1"]) == 2
    assert "--hours is an option of the bible-speech and bible-tts recipes" in capsys.readouterr().err
