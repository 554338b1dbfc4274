"""`encdec serve` through a real HTTP client against a server on a free loopback port, the
batcher on its own, and the web page in headless Chromium."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from encdec.config import ServeConfig
from encdec.serve import Batcher
from encdec.translate import Translator

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"max_inputs": 8, "max_input_chars": 40, "max_body_bytes": 4000, "max_queue": 6,
          "max_beam": 6, "max_wait_ms": 200}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "encdec.cli", "serve", str(tiny_run), "--port", str(port),
           "--threads", "1"] + [f"serve.{k}={v}" for k, v in LIMITS.items()]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            if httpx.get(base + "/v1/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {proc.stdout.read()}")
        time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(timeout=20)


def post(base, body, **kw):
    return httpx.post(base + "/v1/translate", json=body, timeout=30, **kw)


def error_of(response, status):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["status"] == status and err["message"]
    return err["field"]


def test_health_and_model(server, tiny_run):
    health = httpx.get(server + "/v1/health").json()
    assert health["status"] == "ok" and health["queued_inputs"] == 0
    info = httpx.get(server + "/v1/model").json()
    assert info["arch"] == "transformer" and info["d_model"] == 64 and info["parameters"] > 0
    assert info["src_vocab_size"] > 4 and info["tgt_vocab_size"] > 4
    assert info["decode"]["beam_size"] == 3 and info["limits"]["max_inputs"] == 8
    assert "/v1/translate" in httpx.get(server + "/openapi.json").json()["paths"]
    assert httpx.get(server + "/docs").status_code == 200


def test_translate_matches_the_python_api(server, tiny_run):
    words = ["abc", "hgfe", "", "a"]
    r = post(server, {"inputs": words})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["outputs"] == Translator.from_run(tiny_run).translate(words)
    assert data["decode"]["beam_size"] == 3 and len(data["results"]) == 4
    assert data["results"][2]["hypotheses"][0]["text"] == ""
    greedy = post(server, {"inputs": words, "beam": 1}).json()
    assert greedy["decode"]["method"] == "greedy"
    assert greedy["outputs"] == Translator.from_run(tiny_run).translate(words, beam_size=1)


def test_nbest_and_attention(server):
    data = post(server, {"inputs": ["abcd"], "beam": 4, "nbest": 3,
                         "return_attention": True}).json()
    hyps = data["results"][0]["hypotheses"]
    assert len(hyps) == 3
    assert hyps[0]["score"] >= hyps[1]["score"] >= hyps[2]["score"]
    assert data["results"][0]["src_tokens"] == ["a", "b", "c", "d"]
    for h in hyps:
        att = h["attention"]
        assert len(att) == len(h["tokens"]) + 1 and all(len(row) == 4 for row in att)
        assert all(abs(sum(row) - 1) < 1e-4 for row in att)
    plain = post(server, {"inputs": ["abcd"]}).json()
    assert plain["results"][0]["hypotheses"][0]["attention"] is None


def test_limits(server):
    assert error_of(post(server, {"inputs": ["a"] * 9}), 413) == "inputs"
    assert error_of(post(server, {"inputs": ["a", "b" * 41]}), 413) == "inputs[1]"
    big = json.dumps({"inputs": ["a" * 30] * 200})
    assert error_of(httpx.post(server + "/v1/translate", content=big,
                               headers={"content-type": "application/json"}), 413) == "body"

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b" " * 1000
    r = httpx.post(server + "/v1/translate", content=chunks(),
                   headers={"content-type": "application/json"})
    assert error_of(r, 413) == "body"
    assert error_of(post(server, {"inputs": ["a"], "beam": 7}), 422) == "beam"
    r = post(server, {"inputs": ["a"] * 7})  # more than the 6 inputs the queue may hold
    assert error_of(r, 503) == "inputs" and r.headers["retry-after"] == "1"


@pytest.mark.parametrize("body, field", [
    ({"inputs": []}, "inputs"),
    ({}, "inputs"),
    ({"inputs": "abc"}, "inputs"),
    ({"inputs": [1]}, "inputs[0]"),
    ({"inputs": ["a"], "beam": "five"}, "beam"),
    ({"inputs": ["a"], "beam": 0}, "beam"),
    ({"inputs": ["a"], "beam": 2.5}, "beam"),
    ({"inputs": ["a"], "nbest": 3, "beam": 2}, "nbest"),
    ({"inputs": ["a"], "nbest": 2, "beam": 1}, "nbest"),
    ({"inputs": ["a"], "nbest": 7, "method": "sample"}, "nbest"),
    ({"inputs": ["a"], "return_attention": "yes"}, "return_attention"),
    ({"inputs": ["a"], "method": "best"}, "method"),
    ({"inputs": ["a"], "temperature": -1}, "temperature"),
    ({"inputs": ["a"], "beams": 2}, "beams"),
    ([1, 2], "body"),
])
def test_wrong_fields_are_named(server, body, field):
    assert error_of(post(server, body), 422) == field


def test_malformed_json_and_bad_text(server):
    r = httpx.post(server + "/v1/translate", content=b'{"inputs": ["a"',
                   headers={"content-type": "application/json"})
    assert error_of(r, 422) == "body"
    r = httpx.post(server + "/v1/translate", content=b'{"inputs": ["\\ud800"]}',
                   headers={"content-type": "application/json"})
    assert error_of(r, 422) == "inputs[0]"
    r = httpx.post(server + "/v1/translate", content=b'\xff\xfe{}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 422
    # The server is still there and still right.
    assert post(server, {"inputs": ["abc"]}).status_code == 200


def test_unicode_inputs(server):
    texts = ["\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627", "\U0001F600\U0001F44D",
             "e\u0301te\u0301", "a\u200fb", "abc"]
    r = post(server, {"inputs": texts, "return_attention": True})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(texts)
    assert any("outside the vocabulary" in w for w in results[0]["warnings"])
    assert results[5]["warnings"] == []
    for res in results:
        h = res["hypotheses"][0]
        assert len(h["attention"]) == len(h["tokens"]) + 1
        assert all(len(row) == len(res["src_tokens"]) for row in h["attention"])


def test_concurrent_requests_are_batched_with_unchanged_outputs(server, tiny_run):
    words = ["abc", "bad", "hea", "gfed", "a", "cc"]  # the queue holds 6
    responses = [None] * len(words)

    def call(i):
        responses[i] = post(server, {"inputs": [words[i]]})

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(words))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in responses)
    assert max(r.json()["batch_inputs"] for r in responses) > 1
    expected = Translator.from_run(tiny_run).translate(words)
    assert [r.json()["outputs"][0] for r in responses] == expected


# ---- the batcher alone -------------------------------------------------------------------------

class RecordingTranslator:
    """Stands in for a Translator: records the batches and echoes the inputs."""

    def __init__(self):
        self.batches = []
        self.gate = threading.Event()

    def translate_nbest(self, texts, need_attention=False, warn=None, **settings):
        self.gate.wait(10)
        self.batches.append((list(texts), settings.get("beam_size")))
        from encdec.decoding.texts import Translation
        return [[Translation(t.upper(), 0.0, list(t), list(t.upper()))] for t in texts]


def test_batcher_groups_equal_settings_oldest_first():
    tr = RecordingTranslator()
    batcher = Batcher(tr, ServeConfig(max_batch_size=4, max_wait_ms=0))
    jobs = [batcher.submit(["first"], {"beam_size": 1, "return_attention": False}, None)]
    time.sleep(0.2)  # the model thread has taken the first job and waits on the gate
    for texts, beam in ((["a", "b"], 5), (["c"], 1), (["d"], 5), (["e", "f"], 5), (["g"], 1)):
        jobs.append(batcher.submit(texts, {"beam_size": beam, "return_attention": False}, None))
    assert batcher.queued_inputs == 7
    tr.gate.set()
    for job in jobs:
        assert job.done.wait(10)
    batcher.close()
    assert tr.batches == [(["first"], 1), (["a", "b", "d"], 5), (["c", "g"], 1), (["e", "f"], 5)]
    assert [r[0].text for r in jobs[4].result[0]] == ["E", "F"]


def test_batcher_refuses_when_the_queue_is_full():
    from encdec.serve import RequestError
    tr = RecordingTranslator()
    batcher = Batcher(tr, ServeConfig(max_queue=3, max_wait_ms=0))
    batcher.submit(["x"], {"return_attention": False}, None)
    time.sleep(0.2)
    batcher.submit(["a", "b", "c"], {"return_attention": False}, None)
    with pytest.raises(RequestError) as err:
        batcher.submit(["d"], {"return_attention": False}, None)
    assert err.value.status == 503
    tr.gate.set()
    batcher.close()


# ---- the web page ------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium is not installed (`make sysdeps`)")
def test_web_page_shows_outputs_and_heat_map(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('transformer')")
            page.fill("#inputs", "abc\nhgf")
            page.fill("#nbest", "2")
            page.click("#go")
            page.wait_for_selector("#heatmap td")
            hyps = page.locator(".hyp")
            assert hyps.count() == 4
            first = hyps.nth(0).locator(".text").inner_text()
            assert first == post(server, {"inputs": ["abc"]}).json()["outputs"][0]
            tokens = len(first.split())
            assert page.locator("#heatmap thead th").count() == 1 + 3  # corner + a b c
            assert page.locator("#heatmap td").count() == (tokens + 1) * 3
            # Selecting another output redraws the map for it.
            hyps.nth(2).click()
            assert "input 2" in page.locator("#heatmap-caption").inner_text()
            assert page.locator("#heatmap td").count() % 3 == 0
            # A refused request shows the server's message, naming the field.
            page.fill("#inputs", "b" * 41)
            page.click("#go")
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            assert "413" in page.locator("#error").inner_text()
            assert "inputs[0]" in page.locator("#error").inner_text()
            assert not errors
        finally:
            browser.close()
