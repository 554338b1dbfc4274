"""encdec.pipeline: a speech run then a text run equals running the two by hand (the API, per-
stage settings, a first-stage n-best without rescoring); rescoring picks the argmax of the
documented summed score; `encdec pipeline`; a wrong order is refused; `encdec serve RUN --then
RUN` answers POST /v1/transcribe with the by-hand translation."""

import httpx
import pytest
import soundfile

from conftest import tone_word
from encdec.cli import main
from encdec.config import ConfigError
from encdec.pipeline import Pipeline
from encdec.serve import create_app
from encdec.transcribe import Transcriber
from encdec.translate import Translator
from serving import call, serve_cli
from test_serve_speech import serve_config, upload

WORDS = ["abc", "fed", "bead", "cafe", "dab", "ace"]


@pytest.fixture(scope="module")
def wavs(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("pipeline_audio")
    paths = []
    for i, word in enumerate(WORDS):
        paths.append(str(folder / f"{i}-{word}.wav"))
        soundfile.write(paths[-1], tone_word(word), 16000)
    return paths


@pytest.fixture(scope="module")
def asr(tiny_speech_run):
    return Transcriber.from_run(tiny_speech_run)


@pytest.fixture(scope="module")
def mt(tiny_run):
    return Translator.from_run(tiny_run)


@pytest.fixture(scope="module")
def pipeline(tiny_speech_run, tiny_run):
    return Pipeline.from_runs([tiny_speech_run, tiny_run])


def test_pipeline_equals_the_two_runs_by_hand(pipeline, asr, mt, wavs):
    transcripts = asr.transcribe_nbest(wavs)
    translations = mt.translate_nbest([nb[0].text for nb in transcripts])
    assert pipeline.run(wavs) == [nb[0].text for nb in translations]
    for outputs, heard, said in zip(pipeline.run_nbest(wavs), transcripts, translations):
        (out,) = outputs
        assert out.transcript == heard[0].text and out.text == said[0].text
        assert out.score == pytest.approx(heard[0].score + said[0].score, abs=1e-4)
    # per-stage settings reach their stage
    settings = [{"method": "ctc"}, {"beam_size": 1}]
    by_hand = mt.translate(asr.transcribe(wavs, method="ctc"), beam_size=1)
    assert pipeline.run(wavs, stage_overrides=settings) == by_hand


def test_an_asr_nbest_without_rescoring_changes_nothing(pipeline, wavs, monkeypatch):
    plain = pipeline.run_nbest(wavs, nbest=2)
    mt, translated = pipeline.stages[1], []
    real = mt.translate_nbest
    monkeypatch.setattr(mt, "translate_nbest", lambda texts, **kw: translated.extend(texts) or
                        real(texts, **kw))
    wide = pipeline.run_nbest(wavs, nbest=2, asr_nbest=3)
    assert [[(o.transcript, o.text) for o in nb] for nb in wide] == \
        [[(o.transcript, o.text) for o in nb] for nb in plain]
    assert all(len(nb) == 2 for nb in wide)
    assert translated == [nb[0].transcript for nb in plain]  # only the best transcripts


def test_rescoring_picks_the_best_sum_of_asr_and_mt_scores(pipeline, asr, mt, wavs):
    """Each of the 3 transcripts is translated; the output with the largest ASR score + MT
    score wins (the sum the module docstring documents), computed here by hand."""
    rescored = pipeline.run_nbest(wavs, asr_nbest=3, rescore=True)
    changed = 0
    for path, outputs in zip(wavs, rescored):
        (heard,) = asr.transcribe_nbest([path], nbest=3)
        said = [nb[0] for nb in mt.translate_nbest([h.text for h in heard])]
        sums = [h.score + t.score for h, t in zip(heard, said)]
        best = max(range(len(sums)), key=lambda k: (sums[k], -k))
        assert outputs[0].transcript == heard[best].text and outputs[0].text == said[best].text
        assert outputs[0].score == pytest.approx(sums[best], abs=1e-4)
        changed += best != 0
    # the test means something only if rescoring overrules the recognizer somewhere
    assert changed > 0, "rescoring kept every recognizer's best: pick other inputs"
    # the n-best is ordered by the sum, and an output is listed once
    for outputs in pipeline.run_nbest(wavs, nbest=3, asr_nbest=3, rescore=True):
        assert [o.score for o in outputs] == sorted((o.score for o in outputs), reverse=True)
        assert len({o.text for o in outputs}) == len(outputs)


def test_a_wrong_order_is_refused_naming_the_run(tiny_run, tiny_speech_run, wavs, capsys):
    with pytest.raises(ConfigError, match=f"{tiny_run} is a text run, so it cannot be the "
                                          "first stage"):
        Pipeline.from_runs([tiny_run, tiny_speech_run])
    with pytest.raises(ConfigError, match=f"{tiny_speech_run} is a speech run, so it cannot "
                                          "be stage 2"):
        Pipeline.from_runs([tiny_speech_run, tiny_speech_run])
    assert main(["pipeline", str(tiny_run), str(tiny_speech_run), wavs[0]]) == 2
    assert "cannot be the first stage" in capsys.readouterr().err
    assert main(["serve", str(tiny_run), "--then", str(tiny_speech_run)]) == 2
    assert "cannot be the first stage" in capsys.readouterr().err


# Flags, and the stage settings they stand for; each changes some outputs of WORDS.
CLI_SETTINGS = [(["--asr-beam", "1", "--mt-beam", "1"], [{"beam_size": 1}, {"beam_size": 1}]),
                (["--asr-method", "greedy"], [{"method": "greedy"}, {}]),
                (["--asr-ctc-weight", "0"], [{"ctc_weight": 0.0}, {}])]


def test_cli_prints_a_line_per_file_and_the_real_time_factor(tiny_speech_run, tiny_run, pipeline,
                                                             wavs, tmp_path, capsys):
    runs = [str(tiny_speech_run), str(tiny_run)]
    expected = pipeline.run_nbest(wavs[:2])
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    code = main(["pipeline", *runs, wavs[0], str(bad), wavs[1], "--show-transcript",
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2 and "bad.wav: not an audio file" in captured.err
    assert "real-time factor" in captured.err
    assert captured.out.splitlines() == [f"{path}\t{nb[0].text}\t{nb[0].transcript}"
                                         for path, nb in zip(wavs[:2], expected)]
    out = tmp_path / "out.tsv"
    assert main(["pipeline", *runs, *wavs, "-o", str(out), "--no-progress"]) == 0
    assert out.read_text().splitlines() == [f"{p}\t{t}" for p, t in zip(wavs, pipeline.run(wavs))]
    assert "real-time factor" in capsys.readouterr().err
    # the decoding flags reach their stages
    default = pipeline.run(wavs)
    for flags, settings in CLI_SETTINGS:
        texts = pipeline.run(wavs, stage_overrides=settings)
        assert texts != default, f"{flags} change nothing here: pick other settings"
        assert main(["pipeline", *runs, *wavs, *flags, "--no-progress"]) == 0
        assert capsys.readouterr().out.splitlines() == [f"{p}\t{t}" for p, t in zip(wavs, texts)]


def test_serve_then_returns_the_by_hand_translation(asr, mt, wavs):
    app = create_app(asr, serve_config(), then=mt)
    with open(wavs[0], "rb") as f:
        data = f.read()
    answer, info = call(app, upload(data), ("GET", "/v1/model", {}))
    assert answer.status_code == 200, answer.text
    answer = answer.json()
    heard = asr.transcribe([wavs[0]])[0]
    assert answer["text"] == heard and answer["tokens"]  # the usual transcript fields
    assert answer["translation"] == mt.translate([heard])[0]
    stages = info.json()["stages"]
    assert [(s["input"], s["arch"]) for s in stages] == [("audio", "speech"),
                                                         ("text", "transformer")]


def test_serve_then_over_http(tiny_speech_run, tiny_run, asr, mt, wavs, tmp_path):
    for base in serve_cli(tiny_speech_run, ["--then", str(tiny_run)], {}, tmp_path / "log"):
        with open(wavs[1], "rb") as f:
            r = httpx.post(base + "/v1/transcribe", files={"file": ("w.wav", f, "audio/wav")},
                           timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["translation"] == mt.translate(asr.transcribe([wavs[1]]))[0]
