"""Text-to-speech end to end: phoneme inputs, the bible-tts recipe, training both TTS models
(durations learned jointly, or from an autoregressive teacher's attention) through the CLI,
and `encdec speak` / the Python API with speed control and clear errors."""

import io
import json
import math
import shutil

import numpy as np
import pytest
import soundfile
import torch
import yaml

from conftest import needs_system, write_tone_list
from encdec.cli import main
from encdec.data.recipes import SWORD_PACKAGES, sword_installed
from encdec.data.tts import (LEXICON, WORD_BOUNDARY, PhonemeTokenizer, finish_tts_dir,
                             prepare_tts, words_and_pauses)

_missing = ([] if shutil.which("flite") else ["flite"]) + \
    [SWORD_PACKAGES[v] for v in ("kjv", "rv1909") if not sword_installed(v)]
needs_flite = needs_system(_missing, "the bible-tts recipe")

TINY_TTS = {"d_model": 32, "n_heads": 2, "enc_layers": 1, "dec_layers": 1, "ffn_dim": 64,
            "dropout": 0.0, "tts_binarize_from": 2}


def test_phonemes_from_cmudict_with_pauses_and_boundaries():
    tok = PhonemeTokenizer()
    assert words_and_pauses("And God said, Let there-be light: O'er!") == \
        ["and", "god", "said", ",", "let", "there", "be", "light", ":", "o'er", "!"]
    out = tok.encode("God said, Let.")
    b = WORD_BOUNDARY
    assert out == ["G", "AA", "D", b, "S", "EH", "D", ",", b, "L", "EH", "T", "."]
    # A word no lexicon has is spelled; the data directory's lexicon comes before spelling.
    assert tok.encode("zqx") == ["Z", "IY", "K", "Y", "UW", "EH", "K", "S"]
    assert PhonemeTokenizer({"zqx": ["Z", "AH0"]}).encode("zqx") == ["Z", "AH0"]
    assert tok.encode("...") == [".", ".", "."]


def _tone_tts_data(root):
    """A TTS directory whose "speech" is tone words: chars in, their tones' frames out."""
    manifests = {}
    for split, n, seed in (("train", 48, 1), ("dev", 6, 2), ("test", 6, 3)):
        path = write_tone_list(root, split, n, seed)
        rows = [line.split("\t") for line in path.read_text().splitlines()]
        manifests[split] = [{"id": f"{split}{i}", "audio": audio, "text": text.replace(" ", ""),
                             "duration": soundfile.info(str(root / audio)).duration}
                            for i, (audio, text) in enumerate(rows)]
    meta = finish_tts_dir(root, manifests, inputs="chars", log=lambda *a: None)
    meta["name"] = "tones"
    (root / "meta.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def tts_data(tmp_path_factory):
    return _tone_tts_data(tmp_path_factory.mktemp("tts_data"))


def _config(path, data, run, arch, **train):
    cfg = {"data": {"dir": str(data)}, "model": {"arch": arch, **TINY_TTS},
           "train": {"run_dir": str(run), "max_frames": 2000, "lr": 3e-3, "warmup_steps": 5,
                     "valid_every": 6, "log_every": 2, "max_steps": 6, "num_threads": 1, **train}}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def at_run(tts_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("at")
    # scheduled sampling over frames from step 2 on (the two-pass loss through the trainer)
    assert main(["train", str(_config(root / "at.yaml", tts_data, root / "run",
                                      "transformer_tts", scheduled_sampling="linear",
                                      ss_steps=2, ss_max_prob=0.5, ss_start_step=2))]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def nat_run(tts_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("nat")
    assert main(["train", str(_config(root / "nat.yaml", tts_data, root / "run", "fastspeech"))]) == 0
    return root / "run"


def test_training_logs_frame_losses_and_keeps_the_best(nat_run):
    lines = [json.loads(x) for x in (nat_run / "metrics.jsonl").read_text().splitlines()]
    valid = [x for x in lines if "valid_mel_l1" in x]
    assert valid and all(np.isfinite(x["valid_loss"]) for x in valid)
    train = [x for x in lines if "loss" in x]
    assert train[-1]["loss"] < train[0]["loss"]
    assert (nat_run / "checkpoints" / "best").exists()
    assert (nat_run / "data" / "src.vocab").exists()


def test_speak_cli_writes_wav_with_frames_times_hop(nat_run, tmp_path, capsys):
    out = tmp_path / "a.wav"
    assert main(["speak", str(nat_run), "badcafe", "-o", str(out)]) == 0
    audio, rate = soundfile.read(str(out))
    assert rate == 16000 and audio.ndim == 1 and len(audio) > 0
    assert "real-time factor" in capsys.readouterr().err
    lines = tmp_path / "lines.txt"
    lines.write_text("ab\n\ncafe\n")
    assert main(["speak", str(nat_run), "-i", str(lines), "-o", str(tmp_path / "dir")]) == 0
    assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["0001.wav", "0002.wav"]


def test_length_scale_and_token_scales_multiply_durations(nat_run):
    from encdec.speak import Speaker

    speaker = Speaker.from_run(nat_run)
    with torch.no_grad():  # every token predicted to last exactly 5 frames
        speaker.model.duration_out.weight.zero_()
        speaker.model.duration_out.bias.fill_(float(np.log1p(5.0)))
    [one] = speaker.speak(["abc"])
    [slow] = speaker.speak(["abc"], length_scale=1.2)
    [fast] = speaker.speak(["abc"], length_scale=0.8)
    [mixed] = speaker.speak(["abc"], token_scales=[[1.0, 2.0, 0.4]])
    assert one.tokens == ["a", "b", "c"] and one.durations == [5, 5, 5]
    assert slow.durations == [6, 6, 6] and fast.durations == [4, 4, 4]
    assert mixed.durations == [5, 10, 2]
    for s in (one, slow, fast, mixed):
        assert len(s.audio) == sum(s.durations) * 160 and s.mels.shape == (sum(s.durations), 80)


def test_bad_inputs_get_clear_errors(nat_run, tmp_path, capsys):
    from encdec.speak import Speaker, SpeakError

    speaker = Speaker.from_run(nat_run)
    with pytest.raises(SpeakError, match="input 1: empty text"):
        speaker.speak(["ab", "  "])
    with pytest.raises(SpeakError, match="input 0: symbols this run never saw in training: r z"):
        speaker.speak(["zebra"])
    with pytest.raises(SpeakError, match="over the 0.01 s limit"):
        speaker.speak(["abcdef"], max_seconds=0.01)
    with pytest.raises(SpeakError, match="3 token_scales for 2 tokens"):
        speaker.speak(["ab"], token_scales=[[1, 1, 1]])
    lines = tmp_path / "bad.txt"
    lines.write_text("ab\n\nqqq\n")
    assert main(["speak", str(nat_run), "-i", str(lines), "-o", str(tmp_path / "o")]) == 2
    assert f"{lines}:3: symbols this run never saw in training: q" in capsys.readouterr().err
    assert main(["speak", str(nat_run), "ab", "-o", str(tmp_path / "x.mp3")]) == 2
    assert "give a .wav file name" in capsys.readouterr().err


def test_autoregressive_run_speaks_until_its_stop_head(at_run, tmp_path):
    from encdec.speak import Speaker, SpeakError

    speaker = Speaker.from_run(at_run)
    [speech] = speaker.speak(["abc"], max_seconds=0.5)
    assert 0 < len(speech.audio) <= 50 * 160 and len(speech.durations) == 3
    assert sum(speech.durations) == speech.mels.shape[0]
    with pytest.raises(SpeakError, match="need a non-autoregressive"):
        speaker.speak(["abc"], length_scale=1.2)


def test_autoregressive_run_trains_with_scheduled_sampling(at_run):
    lines = [json.loads(x) for x in (at_run / "metrics.jsonl").read_text().splitlines()]
    probs = [(r["step"], r["sampling_prob"]) for r in lines if "sampling_prob" in r]
    assert probs == [(1, 0.0), (2, 0.0), (4, 0.5), (6, 0.5)]
    assert all(math.isfinite(r["loss"]) for r in lines if "loss" in r)


def test_tacotron2_trains_speaks_and_teaches_durations(tts_data, tmp_path, capsys):
    """The Tacotron-2 decoder through the CLI: trained with scheduled sampling (step by
    step), spoken until its stop head, and read as a fastspeech teacher."""
    run = tmp_path / "taco"
    cfg = _config(tmp_path / "taco.yaml", tts_data, run, "tacotron2", max_steps=4,
                  valid_every=4, scheduled_sampling="linear", ss_steps=2, ss_max_prob=0.5,
                  ss_start_step=2)
    model = yaml.safe_load(cfg.read_text())
    model["model"].update(tts_decoder_dim=24, tts_prenet_dim=16)
    cfg.write_text(yaml.safe_dump(model))
    assert main(["train", str(cfg)]) == 0
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["sampling_prob"] for r in lines if "sampling_prob" in r][-1] == 0.5
    assert all(math.isfinite(r["valid_loss"]) for r in lines if "valid_loss" in r)
    out = tmp_path / "t.wav"
    assert main(["speak", str(run), "abc", "-o", str(out)]) == 0
    audio, rate = soundfile.read(str(out))
    assert rate == 16000 and audio.ndim == 1 and len(audio) > 0
    assert main(["speak", str(run), "abc", "-o", str(out), "--length-scale", "1.2"]) == 2
    assert "this one is tacotron2" in capsys.readouterr().err
    student = _config(tmp_path / "s.yaml", tts_data, tmp_path / "student", "fastspeech",
                      max_steps=2, valid_every=2, durations_from=str(run))
    assert main(["train", str(student)]) == 0
    assert "durations: from the attention of" in capsys.readouterr().out


def test_trainer_feeds_the_schedule_to_the_autoregressive_loss(tts_data, tmp_path, monkeypatch):
    """The schedule's probability reaches TransformerTTS.loss in training steps (validation
    stays teacher-forced)."""
    from encdec.models.tts import TransformerTTS

    seen = []
    loss = TransformerTTS.loss

    def recording(self, *args, sampling=0.0, passes=1, **kwargs):
        seen.append((self.training, sampling, passes))
        return loss(self, *args, sampling=sampling, passes=passes, **kwargs)

    monkeypatch.setattr(TransformerTTS, "loss", recording)
    monkeypatch.setattr(TransformerTTS, "forward", recording)
    cfg = _config(tmp_path / "ss.yaml", tts_data, tmp_path / "run", "transformer_tts",
                  max_steps=4, valid_every=4, scheduled_sampling="linear", ss_steps=2,
                  ss_max_prob=0.5, ss_start_step=1, ss_passes=2)
    assert main(["train", str(cfg)]) == 0
    training = [(p, k) for train, p, k in seen if train]
    assert training == [(0.0, 2), (0.0, 2), (0.5, 2), (0.5, 2)]
    assert all(p == 0.0 for train, p, _ in seen if not train) and len(seen) > 4


def test_fastspeech_learns_from_teacher_durations(at_run, tts_data, tmp_path, capsys):
    cfg = _config(tmp_path / "t.yaml", tts_data, tmp_path / "run", "fastspeech", max_steps=2,
                  valid_every=2, durations_from=str(at_run))
    assert main(["train", str(cfg)]) == 0
    assert "durations: from the attention of" in capsys.readouterr().out
    # The teacher must be an autoregressive run on the same inputs.
    cfg = _config(tmp_path / "t2.yaml", tts_data, tmp_path / "run2", "fastspeech", max_steps=2,
                  durations_from=str(tmp_path / "run"))
    assert main(["train", str(cfg)]) == 2
    assert "durations come from an autoregressive TTS run" in capsys.readouterr().err


def test_tts_arch_and_data_must_match(tts_data, tmp_path, capsys):
    cfg = _config(tmp_path / "c.yaml", tts_data, tmp_path / "run", "transformer")
    assert main(["train", str(cfg)]) == 2
    assert "takes model.arch=fastspeech, transformer_tts, tacotron2" in capsys.readouterr().err
    cfg = _config(tmp_path / "s.yaml", tts_data, tmp_path / "run", "fastspeech",
                  scheduled_sampling="linear")
    assert main(["train", str(cfg)]) == 2
    assert "fastspeech model does not read its own frames" in capsys.readouterr().err
    cfg = _config(tmp_path / "p.yaml", tts_data, tmp_path / "run", "transformer",
                  scheduled_sampling="linear", ss_passes=3)
    assert main(["train", str(cfg)]) == 2
    assert "train.ss_passes=3: several predicting passes are built for transformer_tts" \
        in capsys.readouterr().err


@needs_flite
def test_prepare_bible_tts_one_voice_phonemes_resumable(tmp_path):
    opts = dict(voice="flite-slt", train_hours=0.01, eval_verses=2, books=["Ruth", "Jonah"],
                split_verses=(10, 10), log=lambda *a: None)
    out = tmp_path / "tts"
    meta = prepare_tts(out, **opts)
    assert meta["modality"] == "tts" and meta["voice"] == "flite-slt"
    assert meta["src_tokenizer"] == {"kind": "phonemes", "lexicon": LEXICON}
    manifests = {s: [json.loads(x) for x in (out / f"{s}.manifest.jsonl").read_text().splitlines()]
                 for s in ("train", "dev", "test")}
    assert all(manifests.values())
    for e in manifests["train"]:
        info = soundfile.info(str(out / e["audio"]))
        assert info.samplerate == 16000 and e["voice"] == "flite-slt"
        assert any(c in e["text"] for c in ",.;:")  # the verse as printed: pauses kept
    assert (out / "lexicon.tsv").exists() and (out / "feats.stats.safetensors").exists()
    first = out / manifests["train"][0]["audio"]
    stamp = first.stat().st_mtime_ns
    assert prepare_tts(out, **opts)["utterances"] == meta["utterances"]
    assert first.stat().st_mtime_ns == stamp  # not synthesized again


def test_text_commands_refuse_a_tts_run(nat_run, capsys):
    assert main(["translate", str(nat_run), "-i", "/dev/null"]) == 2
    assert "is a text-to-speech run: speak with it" in capsys.readouterr().err


def test_dtw_path_is_the_cheapest_monotonic_path():
    import itertools

    from encdec.evaluate_tts import dtw_path

    rng = np.random.default_rng(0)
    for shape in ((1, 1), (1, 4), (4, 1), (3, 4), (4, 4), (5, 3)):
        cost = rng.random(shape)
        best = np.inf
        I, J = shape
        # every monotonic path as a sequence of moves: brute force over move strings
        for n in range(max(I, J) - 1, I + J - 1):
            for moves in itertools.product(((1, 0), (0, 1), (1, 1)), repeat=n):
                i = j = 0
                total = cost[0, 0]
                for di, dj in moves:
                    i, j = i + di, j + dj
                    if i >= I or j >= J:
                        break
                    total += cost[i, j]
                else:
                    if (i, j) == (I - 1, J - 1):
                        best = min(best, total)
        path = dtw_path(cost)
        assert path[0] == (0, 0) and path[-1] == (I - 1, J - 1)
        assert all(0 <= b[0] - a[0] <= 1 and 0 <= b[1] - a[1] <= 1 and a != b
                   for a, b in zip(path, path[1:]))
        assert sum(cost[i, j] for i, j in path) == pytest.approx(best)


def test_mcd_is_zero_on_itself_and_ignores_time_stretch():
    from encdec.evaluate_tts import mcd_dtw

    rng = np.random.default_rng(1)
    mel = rng.normal(size=(40, 80))
    assert mcd_dtw(mel, mel) == pytest.approx(0.0, abs=1e-9)
    assert mcd_dtw(np.repeat(mel, 2, axis=0), mel) == pytest.approx(0.0, abs=1e-9)
    assert mcd_dtw(mel + 3 * rng.normal(size=mel.shape), mel) > 1.0


def test_evaluate_judges_reference_copy_and_model(nat_run, tts_data, capsys):
    assert main(["evaluate", str(nat_run), "--split", "test", "--limit", "3"]) == 0
    out = capsys.readouterr().out
    assert "reference recording" in out and "copy synthesis" in out and "MCD (DTW)" in out
    result = json.loads((nat_run / "eval" / "tts-test-limit3.json").read_text())
    assert set(result["systems"]) == {"reference", "copy", "model"} and result["inputs"] == 3
    assert result["mcd_db"] > 0 and result["mel_rtf"] > 0
    assert len(list((nat_run / "eval" / "tts-test-limit3").glob("*.wav"))) == 3
    first = result["utterances"][0]
    assert set(first["judge_heard"]) == {"reference", "copy", "model"}
    from encdec.audio.judge import judge_text

    assert first["scored_against"] == judge_text(first["text"]) and first["scored_against"]
    # the judged audio is what a user gets from the Python API, whatever the batch
    import soundfile

    from encdec.speak import Speaker

    texts = [u["text"] for u in result["utterances"]]
    spoken = Speaker.from_run(nat_run).speak(texts[::-1])[::-1]
    for u, speech in zip(result["utterances"], spoken):
        judged, _ = soundfile.read(str(nat_run / "eval" / "tts-test-limit3" / f"{u['id']}.wav"),
                                   dtype="float32")
        assert judged.shape == speech.audio.shape
        assert np.abs(judged - speech.audio).max() <= 1.0 / 32768 + 1e-6
    # another checkpoint's scores go to their own file, as the text evaluation's do
    before = (nat_run / "eval" / "tts-test-limit3.json").read_text()
    assert main(["evaluate", str(nat_run), "--limit", "1", "--checkpoint", "last"]) == 0
    other = json.loads((nat_run / "eval" / "tts-test-last-limit1.json").read_text())
    assert other["inputs"] == 1 and other["checkpoint"].startswith("step-")
    assert (nat_run / "eval" / "tts-test-limit3.json").read_text() == before


def test_evaluate_with_our_own_recognizer_as_a_second_judge(nat_run, tiny_speech_run, tiny_run,
                                                            capsys):
    """--asr-judge transcribes the same three systems' audio with an encdec recognizer; its
    scores are those of transcribing that audio by hand, labelled as encdec's own."""
    from encdec.audio.judge import judge_text
    from encdec.audio.io import read_audio
    from encdec.data.utterances import audio_file, read_manifest
    from encdec.metrics import asr_scores
    from encdec.transcribe import Transcriber

    assert main(["evaluate", str(nat_run), "--split", "test", "--limit", "2",
                 "--asr-judge", str(tiny_speech_run)]) == 0
    out = capsys.readouterr().out
    assert f"judged by encdec's own recognizer {tiny_speech_run}" in out
    result = json.loads((nat_run / "eval" / "tts-test-limit2.json").read_text())
    own = result["asr_judge"]
    assert own["run"] == str(tiny_speech_run) and set(own["systems"]) == {"reference", "copy",
                                                                         "model"}
    data = yaml.safe_load((nat_run / "config.yaml").read_text())["data"]["dir"]
    entries = read_manifest(data, "test")[:2]
    waves = [(read_audio(audio_file(data, e["audio"]), 16000).numpy(), 16000) for e in entries]
    heard = [judge_text(t) for t in Transcriber.from_run(tiny_speech_run).transcribe(waves)]
    assert [u["asr_judge_heard"]["reference"] for u in result["utterances"]] == heard
    refs = [[judge_text(e["text"])] for e in entries]
    assert own["systems"]["reference"]["wer"] == pytest.approx(asr_scores(heard, refs)["wer"])
    # pocketsphinx's scores stay where they were
    assert set(result["systems"]) == {"reference", "copy", "model"}
    # a run that is not a recognizer, and a run that is not text-to-speech, are refused
    assert main(["evaluate", str(nat_run), "--limit", "1", "--asr-judge", str(tiny_run)]) == 2
    assert "not a speech recognition run" in capsys.readouterr().err
    assert main(["evaluate", str(tiny_run), "--asr-judge", str(tiny_speech_run)]) == 2
    assert "judges the audio of a text-to-speech run" in capsys.readouterr().err


def test_cli_prepare_bible_tts_options(tmp_path, monkeypatch, capsys):
    import encdec.data.tts as tts

    seen = {}
    monkeypatch.setattr(tts, "prepare_tts", lambda out, **kw: seen.update(out=out, **kw))
    assert main(["prepare", "bible-tts", "--out", str(tmp_path / "t"), "--voice", "flite-awb",
                 "--inputs", "chars", "--hours", "0.5"]) == 0
    assert seen == {"out": tmp_path / "t", "voice": "flite-awb", "inputs": "chars",
                    "train_hours": 0.5, "g2p_run": None}
    assert main(["prepare", "g2p-cmudict", "--out", str(tmp_path / "g"), "--voice", "x"]) == 2
    assert "--voice, --inputs and --g2p are options of the bible-tts recipe" in \
        capsys.readouterr().err


# ---- encdec serve on a TTS run: POST /v1/speak and the web page --------------------------------

def _fixed_speaker(run, frames: float = 5.0):
    """A Speaker of ``run`` whose duration head predicts ``frames`` for every token."""
    from encdec.speak import Speaker

    speaker = Speaker.from_run(run)
    with torch.no_grad():
        speaker.model.duration_out.weight.zero_()
        speaker.model.duration_out.bias.fill_(float(np.log1p(frames)))
    return speaker


def _speak_app(speaker, **limits):
    from encdec.config import ServeConfig
    from encdec.serve import create_app

    return create_app(speaker, ServeConfig(**{"max_wait_ms": 0, **limits}))


def _speak(app, *bodies):
    from serving import call

    return call(app, *[("POST", "/v1/speak", {"json": b}) for b in bodies])


def test_serve_speak_returns_the_wav_and_json_with_mels_and_durations(nat_run):
    import base64

    from serving import call

    speaker = _fixed_speaker(nat_run)
    app = _speak_app(speaker)
    info = call(app, ("GET", "/v1/model", {}))[0].json()
    assert info["input"] == "text" and info["output"] == "audio" and info["sample_rate"] == 16000
    assert info["arch"] == "fastspeech" and info["length_scale"] is True
    wav, js, slow = _speak(app, {"text": "abc"}, {"text": "abc", "format": "json"},
                           {"text": "abc", "length_scale": 1.2, "format": "json"})
    assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav"
    audio, rate = soundfile.read(io.BytesIO(wav.content), dtype="float32")
    [expected] = speaker.speak(["abc"], max_seconds=60)
    assert rate == 16000 and len(audio) == 15 * 160 == len(expected.audio)
    assert np.abs(audio - expected.audio).max() < 1e-4  # the same samples, as 16-bit PCM
    assert float(wav.headers["x-encdec-seconds"]) == pytest.approx(0.15)
    body = js.json()
    assert body["tokens"] == ["a", "b", "c"] and body["durations"] == [5, 5, 5]
    assert base64.b64decode(body["audio_wav"]) == wav.content
    assert np.array(body["mel"]).shape == (15, 80) and body["seconds"] == pytest.approx(0.15)
    assert np.allclose(body["mel"], expected.mels, atol=0.006)
    assert slow.json()["durations"] == [6, 6, 6]
    # Requests with the same settings are synthesized together; the output does not change.
    texts = ["ab", "cafe", "bead", "fab"]
    together = _speak(app, *[{"text": t, "format": "json"} for t in texts])
    assert max(r.json()["batch_inputs"] for r in together) > 1
    for t, r in zip(texts, together):
        alone = speaker.speak([t])[0]
        assert r.json()["durations"] == [5] * len(t)
        assert np.allclose(r.json()["mel"], alone.mels, atol=0.006)
        heard, _ = soundfile.read(io.BytesIO(base64.b64decode(r.json()["audio_wav"])),
                                  dtype="float32")
        assert np.abs(heard - alone.audio).max() < 1e-4
    assert "/v1/speak" in call(app, ("GET", "/openapi.json", {}))[0].json()["paths"]


@pytest.mark.parametrize("body, status, field, words", [
    ({"text": "  "}, 422, "text", "empty text"),
    ({"text": "a" * 10_000}, 413, "text", "10000 characters; the limit is 1000"),
    ({"text": "zebra"}, 422, "text", "never saw in training: r z"),
    ({"text": "ab", "length_scale": 0}, 422, "length_scale", "greater than 0"),
    ({"text": "ab", "length_scale": 5}, 422, "length_scale", "less than or equal to 4"),
    ({"text": "ab", "length_scale": "fast"}, 422, "length_scale", "valid number"),
    ({"text": "ab", "token_scales": [1, 2, 3]}, 422, "token_scales", "3 factors for 2 input"),
    ({"text": "ab", "token_scales": [1, 0]}, 422, "token_scales[1]", "out of range"),
    ({"text": "ab", "format": "mp3"}, 422, "format", "'wav' or 'json'"),
    ({"text": "ab", "voice": "x"}, 422, "voice", "known: text, length_scale"),
    ({"inputs": ["ab"]}, 422, "text", "Field required"),
    ({"text": "abcdef" * 10}, 413, "text", "over the 0.5 s limit"),
])
def test_serve_speak_refuses_bad_requests_naming_the_field(nat_run, body, status, field, words):
    from serving import error_of

    [r] = _speak(_speak_app(_fixed_speaker(nat_run), max_audio_seconds=0.5), body)
    assert error_of(r, status) == field
    assert words in r.json()["error"]["message"]


def test_serve_speak_on_other_paths_and_autoregressive_runs(nat_run, at_run):
    from encdec.speak import Speaker
    from serving import call, error_of

    app = _speak_app(_fixed_speaker(nat_run))
    [r] = call(app, ("POST", "/v1/translate", {"json": {"inputs": ["ab"]}}))
    assert error_of(r, 404) == "path" and "POST JSON to /v1/speak" in r.json()["error"]["message"]
    at = _speak_app(Speaker.from_run(at_run), max_audio_seconds=1.0)
    ok, scaled = _speak(at, {"text": "ab"}, {"text": "ab", "length_scale": 1.2})
    assert ok.status_code == 200 and 0 < soundfile.info(io.BytesIO(ok.content)).duration <= 1.0
    assert error_of(scaled, 422) == "length_scale"
    assert "speed control needs a fastspeech run" in scaled.json()["error"]["message"]


@pytest.fixture(scope="module")
def speak_server(nat_run, tmp_path_factory):
    from serving import serve_cli

    log = tmp_path_factory.mktemp("speak_server") / "server.log"
    yield from serve_cli(nat_run, [], {}, log)


def test_serve_cli_on_a_tts_run_answers_a_real_client(speak_server):
    import httpx

    r = httpx.post(speak_server + "/v1/speak", json={"text": "badcafe"}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
    assert soundfile.info(io.BytesIO(r.content)).samplerate == 16000
    r = httpx.post(speak_server + "/v1/speak", json={"text": ""}, timeout=30)
    assert r.status_code == 422 and r.json()["error"]["field"] == "text"


def _chromium():
    from serving import CHROMIUM

    return CHROMIUM


@needs_system([] if _chromium() else ["chromium"], "the web page test")
def test_web_page_speaks_plays_and_shows_mels_and_durations(speak_server):
    import httpx
    from playwright import sync_api  # pinned in the Makefile: missing is an error

    text = "badcafe"
    response = httpx.post(speak_server + "/v1/speak", json={"text": text, "format": "json"},
                          timeout=30)
    assert response.status_code == 200, response.text
    expected = response.json()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=_chromium(), headless=True)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(speak_server + "/")
            page.wait_for_function(
                "document.getElementById('model').textContent.includes('input symbols')")
            assert page.locator("#go").inner_text() == "Speak"
            assert page.locator("#beam").is_hidden() and page.locator("#length_scale").is_visible()
            page.fill("#inputs", text)
            page.click("#go")
            page.wait_for_selector("#durations li")
            # The audio element loads the WAV and has the duration the server reported.
            page.wait_for_function("document.getElementById('speech').readyState >= 1")
            duration = page.evaluate("document.getElementById('speech').duration")
            assert duration == pytest.approx(expected["seconds"], abs=0.01)
            assert page.locator("#durations li").count() == len(expected["tokens"])
            assert [int(x) for x in page.locator("#durations li").evaluate_all(
                "items => items.map(li => li.dataset.frames)")] == expected["durations"]
            assert page.evaluate("document.getElementById('mel').width") == \
                sum(expected["durations"])
            assert page.evaluate("document.getElementById('mel').height") == 80
            # Slower speech: the length scale reaches the server.
            page.fill("#length_scale", "2")
            page.click("#go")
            page.wait_for_function(f"Math.abs(document.getElementById('speech').duration - "
                                   f"{expected['seconds']}) > 0.05")
            assert page.evaluate("document.getElementById('speech').duration") > duration
            # A symbol the run never saw: the server's 422 is shown.
            page.fill("#inputs", "zebra")
            page.click("#go")
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert "422: text: symbols this run never saw" in page.locator("#error").inner_text()
            assert not errors
        finally:
            browser.close()
