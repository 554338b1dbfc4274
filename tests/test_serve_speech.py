"""`encdec serve` on a speech run: POST /v1/transcribe in-process (uploads as a form or as the
body, token times, refusals as JSON, API keys, batching), the token-time and attention-matrix
helpers by hand, and the web page in headless Chromium: a file upload, and a recording from
Chromium's fake microphone."""

import io
import itertools
import math

import numpy as np
import pytest
import soundfile
import torch

from conftest import needs_system, tone_word
from encdec.config import ServeConfig
from encdec.serve import create_app
from encdec.serve.audio import _align, _attention_matrix, _token_starts
from encdec.transcribe import Transcriber
from serving import AUTH, CHROMIUM, KEY, call, error_of, serve_cli

RATE = 16000


def serve_config(max_audio_seconds: float = 3.0, **limits) -> ServeConfig:
    return ServeConfig(**{"max_audio_bytes": 200_000, "max_wait_ms": 0,
                          "max_audio_seconds": max_audio_seconds, **limits})


def audio_bytes(samples, rate: int = RATE, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, rate, format=fmt, subtype=subtype)
    return out.getvalue()


def upload(data: bytes, name: str = "word.wav", query: str = "", **form):
    """A multipart request to /v1/transcribe: the file in field 'file', ``form`` beside it."""
    return ("POST", "/v1/transcribe" + query,
            {"files": {"file": (name, data, "audio/wav")}, "data": form})


def raw(data: bytes, content_type: str = "audio/wav", query: str = "", headers=None):
    return ("POST", "/v1/transcribe" + query,
            {"content": data, "headers": {"content-type": content_type, **(headers or {})}})


@pytest.fixture(scope="module")
def transcriber(tiny_speech_run):
    return Transcriber.from_run(tiny_speech_run)


@pytest.fixture(scope="module")
def app(transcriber):
    return create_app(transcriber, serve_config())


@pytest.fixture(scope="module")
def word_wav(tmp_path_factory):
    """A 0.5 s tone word as a 16-bit WAV file."""
    path = tmp_path_factory.mktemp("audio") / "abcde.wav"
    soundfile.write(str(path), tone_word("abcde"), RATE)
    return path


def check_alignment(answer: dict) -> None:
    """One span per token, in order, tiling [first start, duration] inside [0, duration]."""
    spans, duration = answer["alignment"], answer["duration_s"]
    assert [s["token"] for s in spans] == answer["tokens"]
    for span, after in zip(spans, spans[1:] + [None]):
        assert 0 <= span["start_s"] <= span["end_s"] <= duration
        assert span["end_s"] == (after["start_s"] if after else duration)


def test_the_model_description_says_it_takes_audio(app):
    info, spec = call(app, ("GET", "/v1/model", {}), ("GET", "/openapi.json", {}))
    info = info.json()
    assert info["input"] == "audio" and info["arch"] == "speech" and info["sample_rate"] == RATE
    assert info["methods"] == ["greedy", "beam", "ctc"] and info["ctc"] is True
    assert info["limits"]["max_audio_seconds"] == 3.0
    assert info["seconds_per_position"] == pytest.approx(0.04)  # 10 ms frames, subsampling 4
    paths = spec.json()["paths"]
    assert "/v1/transcribe" in paths and "/v1/translate" not in paths


def test_an_upload_gives_its_transcript_and_token_times(app, transcriber, word_wav):
    data = word_wav.read_bytes()
    beam, ctc = call(app, upload(data), upload(data, query="?attention=1", method="ctc"))
    assert beam.status_code == 200, beam.text
    answer = beam.json()
    assert answer["text"] == transcriber.transcribe([word_wav])[0]  # the run's defaults
    assert answer["text"] == " ".join(answer["tokens"]) and answer["tokens"]
    assert answer["method"] == "beam" and answer["beam"] == 3 and answer["ctc_weight"] == 0.3
    assert answer["duration_s"] == 0.5 and answer["warnings"] == [] and answer["decode_s"] > 0
    assert answer["attention"] is None  # only with ?attention=1
    check_alignment(answer)
    answer = ctc.json()
    assert answer["text"] == transcriber.transcribe([word_wav], method="ctc")[0]
    assert answer["method"] == "ctc" and answer["beam"] is None and answer["ctc_weight"] is None
    check_alignment(answer)
    positions = math.ceil(0.5 / 0.04)  # about one encoder position per 40 ms
    assert len(answer["attention"]) == len(answer["tokens"]) + 1
    assert all(abs(len(row) - positions) <= 2 for row in answer["attention"])
    assert answer["attention_step_s"] == pytest.approx(0.04)


def test_ctc_token_times_give_repeated_letters_their_own_times(app, transcriber):
    """CTC posterior rows are per label: every "a" has the same row, yet each "a" gets a
    time of its own (one encoder position per token, rising)."""
    r, = call(app, raw(audio_bytes(tone_word("abcabcab")), query="?method=ctc"))
    answer = r.json()
    assert answer["tokens"].count("a") >= 2, answer["text"]
    check_alignment(answer)
    starts = [span["start_s"] for span in answer["alignment"]]
    assert all(a < b for a, b in itertools.pairwise(starts)), starts


def test_the_body_itself_can_be_the_audio(app, transcriber, word_wav):
    wav, = call(app, raw(word_wav.read_bytes(), query="?method=greedy"))
    assert wav.status_code == 200, wav.text
    assert wav.json()["text"] == transcriber.transcribe([word_wav], method="greedy")[0]
    # Any rate and format libsndfile reads: 8 kHz FLAC is resampled.
    slow = np.interp(np.arange(4000) * 2, np.arange(8000), tone_word("abcde"))
    flac, = call(app, raw(audio_bytes(slow, 8000, "FLAC"), "audio/flac; rate=8000"))
    assert flac.status_code == 200, flac.text
    assert flac.json()["duration_s"] == 0.5
    check_alignment(flac.json())


@pytest.mark.parametrize("name, data, field, words", [
    ("notes.txt", b"these are not samples", "file", "not an audio file"),
    ("empty.wav", b"", "file", "empty"),
    ("nan.wav", audio_bytes(np.full(4000, np.nan, dtype=np.float32), subtype="FLOAT"), "file",
     "NaN"),
    ("click.wav", audio_bytes(np.zeros(100, dtype=np.float32)), "file", "too short"),
])
def test_unusable_uploads_are_422_naming_the_upload(app, name, data, field, words):
    r, = call(app, upload(data, name))
    assert error_of(r, 422) == field
    message = r.json()["error"]["message"]
    assert message.startswith(f"{name}: ") and words in message


def test_an_unusable_body_is_422_naming_the_body(app):
    r, = call(app, raw(b"RIFF....WAVEfmt nonsense"))
    assert error_of(r, 422) == "body"
    assert r.json()["error"]["message"].startswith("the request body: not an audio file")


def test_too_much_audio_is_413(app, monkeypatch):
    long = np.concatenate([tone_word("abcde")] * 8)  # 4 s; the limit is 3 s
    r, = call(app, upload(audio_bytes(long), "long.wav"))
    assert error_of(r, 413) == "file"
    assert "long.wav: 4.0 s" in r.json()["error"]["message"]
    assert "serve.max_audio_seconds" in r.json()["error"]["message"]

    # Compressed audio is judged by its header, before the samples are decoded.
    def never(*args, **kw):
        raise AssertionError("decoded audio that its header says is too long")

    monkeypatch.setattr("encdec.audio.io.read_audio_bytes", never)
    r, = call(app, raw(audio_bytes(np.concatenate([long] * 3), fmt="FLAC"), "audio/flac"))
    assert error_of(r, 413) == "body" and "12.0 s" in r.json()["error"]["message"]
    monkeypatch.undo()
    # A body over serve.max_audio_bytes is refused before it is read.
    r, = call(app, raw(b"\0" * 200_001))
    assert error_of(r, 413) == "body" and "200000" in r.json()["error"]["message"]


@pytest.mark.parametrize("content_type", ["application/json", "text/plain",
                                          "application/octet-stream", None])
def test_what_is_not_audio_or_a_form_is_415(app, word_wav, content_type):
    headers = {"content-type": content_type} if content_type else {}
    r, = call(app, ("POST", "/v1/transcribe", {"content": word_wav.read_bytes(),
                                                "headers": headers}))
    assert error_of(r, 415) == "content-type"
    assert "multipart/form-data" in r.json()["error"]["message"]


@pytest.mark.parametrize("query, form, field", [
    ("?method=sample", {}, "method"),
    ("?beam=0", {}, "beam"),
    ("", {"beam": "five"}, "beam"),
    ("?beam=17", {}, "beam"),  # over serve.max_beam
    ("?ctc_weight=2", {}, "ctc_weight"),
    ("", {"method": "greedy", "ctc_weight": "0.5"}, "ctc_weight"),  # beam search only
    ("?attention=maybe", {}, "attention"),
    ("?language=en", {}, "language"),
    ("", {"language": "en"}, "language"),
    ("?method=beam", {"method": "ctc"}, "method"),  # given twice
])
def test_wrong_fields_are_named(app, word_wav, query, form, field):
    r, = call(app, upload(word_wav.read_bytes(), query=query, **form))
    assert error_of(r, 422) == field


def test_a_form_without_its_file_is_422(app):
    r, = call(app, ("POST", "/v1/transcribe", {"files": {"audio": ("a.wav", b"x", "audio/wav")}}))
    assert error_of(r, 422) == "audio"  # an unknown field, named
    r, = call(app, ("POST", "/v1/transcribe", {"files": {"method": (None, b"ctc")}}))
    assert error_of(r, 422) == "file"
    r, = call(app, raw(b"no parts here", "multipart/form-data; boundary=xyz"))
    assert error_of(r, 422) == "body"


def test_text_requests_are_refused_saying_the_model_takes_audio(app):
    for r in call(app, ("POST", "/v1/translate", {"json": {"inputs": ["abc"]}}),
                  ("GET", "/v1/translate", {})):
        assert error_of(r, 404) == "path"
        assert "takes audio" in r.json()["error"]["message"]
        assert "/v1/transcribe" in r.json()["error"]["message"]


def test_an_api_key_is_needed_when_configured(transcriber, word_wav):
    app = create_app(transcriber, serve_config(), api_keys=[KEY])
    page, none, wrong, ok = call(app, ("GET", "/", {}), upload(word_wav.read_bytes()),
                                 raw(word_wav.read_bytes(), headers={"Authorization": "Bearer no"}),
                                 raw(word_wav.read_bytes(), headers=AUTH))
    assert page.status_code == 200 and "<input id=\"file\"" in page.text
    for r in (none, wrong):
        assert error_of(r, 401) == "authorization"
    assert ok.status_code == 200 and ok.json()["tokens"]


def test_a_failing_decode_is_a_500_naming_the_file(transcriber, word_wav, monkeypatch):
    def broken(inputs, **kw):
        raise RuntimeError("the model choked")

    monkeypatch.setattr(transcriber, "transcribe_nbest", broken)
    r, = call(create_app(transcriber, serve_config()), upload(word_wav.read_bytes()))
    assert error_of(r, 500) == "file" and "RuntimeError" in r.json()["error"]["message"]


def test_concurrent_uploads_share_a_batch_with_unchanged_outputs(transcriber, tmp_path):
    words = ["ab", "fedcba", "cafe", "bead"]
    paths = []
    for w in words:
        paths.append(tmp_path / f"{w}.wav")
        soundfile.write(str(paths[-1]), tone_word(w), RATE)
    app = create_app(transcriber, serve_config(max_wait_ms=500))
    answers = call(app, *[upload(p.read_bytes(), p.name) for p in paths])
    assert [a.json()["text"] for a in answers] == transcriber.transcribe(paths)
    health, = call(app, ("GET", "/v1/health", {}))
    assert health.json()["decoded_inputs"] == 4 and health.json()["batches"] < 4


def test_long_audio_is_decoded_in_segments_with_times_across_them(transcriber, monkeypatch):
    monkeypatch.setattr(transcriber, "max_segment_s", 6.0)  # shortest split_long allows
    long = np.concatenate([tone_word(w) for w in ["abcde", "fab", "cdef"] * 6])  # 7.56 s
    app = create_app(transcriber, serve_config(max_audio_seconds=10, max_audio_bytes=400_000))
    r, = call(app, raw(audio_bytes(long), query="?attention=1"))
    assert r.status_code == 200, r.text
    answer = r.json()
    assert "decoded in 2 segments" in answer["warnings"][0]
    assert answer["duration_s"] == round(long.size / RATE, 3)
    check_alignment(answer)
    assert answer["alignment"][-1]["start_s"] >= 5.0  # the second segment starts after 5 s
    attention = answer["attention"]
    assert len(attention) == len(answer["tokens"]) + 1
    assert all(abs(sum(row) - 1) < 2e-2 for row in attention)  # cross-attention rows
    assert len(attention[0]) * answer["attention_step_s"] == pytest.approx(7.56, abs=0.2)


# ---- the helpers, by hand ----------------------------------------------------------------------

def test_token_times_follow_the_row_peaks_on_a_rising_path():
    attention = torch.zeros(4, 8)  # 3 tokens + </s> over 8 positions of 40 ms
    for row, peak in enumerate([2, 4, 5, 7]):
        attention[row, peak] = 1.0
    starts = _token_starts(attention, 3, 0.04, start_s=1.0, end_s=1.5)
    assert starts == pytest.approx([1.08, 1.16, 1.2])  # rising peaks; the segment starts at 1 s
    # The second token peaks before the first; its runner-up comes after it: that one is taken.
    attention[1] = torch.tensor([0, .6, 0, .3, 0, 0, 0, .1])
    assert _token_starts(attention, 3, 0.04, 1.0, 1.5) == pytest.approx([1.08, 1.12, 1.2])
    # CTC rows are per label: "a b a" has one row twice. Each "a" gets a peak of its own (the
    # peaks made monotone would put the second "a" on "b").
    a, b = torch.tensor([0, .5, 0, 0, 0, 0, .5, 0]), torch.tensor([0, 0, 0, 1., 0, 0, 0, 0])
    assert _token_starts(torch.stack([a, b, a]), 3, 1.0, 0.0, 8.0) == [1.0, 3.0, 6.0]
    assert _token_starts(torch.stack([a, a]), 2, 1.0, 0.0, 8.0) == [1.0, 6.0]
    # More tokens than positions: they may share one. Never past the segment's end.
    assert _token_starts(torch.eye(2)[[1, 1, 1]], 3, 1.0, 0.0, 0.5) == [0.5, 0.5, 0.5]
    assert _token_starts(torch.ones(3, 0), 2, 0.04, 2.0, 2.01) == [2.0, 2.0]
    assert _token_starts(torch.ones(1, 3), 0, 0.04, 0.0, 1.0) == []


def test_token_spans_end_where_the_next_token_starts():
    spans = _align(["x", "y", "z"], [1.08, 1.08, 1.2], end_s=2.0)
    assert spans == [{"token": "x", "start_s": 1.08, "end_s": 1.08},
                     {"token": "y", "start_s": 1.08, "end_s": 1.2},
                     {"token": "z", "start_s": 1.2, "end_s": 2.0}]  # the last: to the end
    assert _align([], [], 1.0) == []


def test_the_attention_matrix_places_segments_side_by_side_and_pools_columns():
    first = (2, torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, 1]]))  # 2 tokens + </s>
    second = (1, torch.tensor([[0., 1], [.5, .5]]))
    matrix, group = _attention_matrix([first, second])
    assert group == 1 and matrix == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 0, 0, 1],
                                     [0, 0, 0, .5, .5]]
    pooled, group = _attention_matrix([first, second], max_columns=2)
    assert group == 3 and pooled == [[1, 0], [1, 0], [0, 1], [0, 1]]  # rows still sum to 1


def test_attention_columns_are_the_audio_s_own_positions(transcriber):
    """Decoded in a batch with longer audio, an upload's attention rows keep only its own
    encoder positions: the count _positions gives, as the model's encoder makes them."""
    from encdec.serve.audio import _positions

    waves = [torch.from_numpy(tone_word(w)) for w in ("ab", "abcdef")]
    feats, frames = transcriber.assets.audio_front(waves)
    with torch.no_grad():
        memory_mask = transcriber.model.encode(feats, frames).memory_mask  # (B, S)
    assert [_positions(transcriber, w.numel()) for w in waves] == memory_mask.sum(1).tolist()


# ---- the web page ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def speech_server(tiny_speech_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("speech_server") / "server.log"
    yield from serve_cli(tiny_speech_run, [], {}, log)


def _browser(pw, *args):
    return pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=list(args))


def _open(browser, base):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('audio at')")
    return page, errors


@needs_system([] if CHROMIUM else ["chromium"], "the web page test")
def test_web_page_transcribes_an_uploaded_file(speech_server, word_wav, tmp_path):
    import httpx
    from playwright import sync_api  # pinned in the Makefile: missing is an error

    expected = httpx.post(speech_server + "/v1/transcribe", content=word_wav.read_bytes(),
                          headers={"content-type": "audio/wav"}, timeout=30).json()
    with sync_api.sync_playwright() as pw:
        browser = _browser(pw)
        try:
            page, errors = _open(browser, speech_server)
            assert page.locator("#inputs").is_hidden() and page.locator("#file").is_visible()
            assert page.locator("#go").inner_text() == "Transcribe"
            page.set_input_files("#file", str(word_wav))
            page.wait_for_selector("#alignment")
            # The page sends 16-bit WAV decoded in the browser: the same samples, same text.
            assert page.locator("#transcript").inner_text() == expected["text"]
            spans = page.locator("#alignment li")
            assert spans.count() == len(expected["tokens"])
            first = expected["alignment"][0]
            assert spans.nth(0).inner_text().split() == [
                first["token"], f"{first['start_s']:.2f}–{first['end_s']:.2f}", "s"]
            rows = len(expected["tokens"]) + 1
            assert page.locator("#heatmap tbody tr").count() == rows
            assert page.locator("#heatmap td").count() % rows == 0
            assert page.locator("#heatmap td").count() >= rows * 10  # 0.5 s in 40 ms bins
            assert page.locator("#error").inner_text() == ""
            # A file that is not audio goes up as it is, and the server's 422 names it.
            notes = tmp_path / "notes.txt"
            notes.write_text("not audio")
            page.set_input_files("#file", str(notes))
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert "422" in page.locator("#error").inner_text()
            assert "notes.txt: not an audio file" in page.locator("#error").inner_text()
            assert not errors
        finally:
            browser.close()


@needs_system([] if CHROMIUM else ["chromium"], "the web page test")
def test_web_page_records_from_the_microphone(speech_server, tmp_path):
    from playwright import sync_api  # pinned in the Makefile: missing is an error

    mic = tmp_path / "mic.wav"  # Chromium's fake microphone plays this file in a loop
    soundfile.write(str(mic), np.concatenate([tone_word(w) for w in ("abc", "fed", "cab")]), RATE)
    with sync_api.sync_playwright() as pw:
        browser = _browser(pw, "--use-fake-ui-for-media-stream",
                           "--use-fake-device-for-media-stream",
                           f"--use-file-for-fake-audio-capture={mic}")
        try:
            page, errors = _open(browser, speech_server)
            page.click("#record")
            page.wait_for_function("document.getElementById('record').textContent === 'Stop'")
            page.wait_for_timeout(1500)
            with page.expect_response(lambda r: "/v1/transcribe" in r.url) as sent:
                page.click("#record")
            response = sent.value
            assert response.status == 200, response.text()
            page.wait_for_selector("#alignment")
            answer = response.json()
            assert 1.0 <= answer["duration_s"] <= 3.0
            assert page.locator("#transcript").inner_text() == (answer["text"] or "(empty)")
            assert page.locator("#alignment li").count() == len(answer["tokens"])
            assert "recording.wav" in page.locator(".result .src").inner_text()
            assert page.locator("#record").inner_text() == "Record"
            assert page.locator("#error").inner_text() == ""
            assert not errors
        finally:
            browser.close()
