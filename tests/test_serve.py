"""`encdec serve` through a real HTTP client against a server on a free loopback port, the
batcher on its own, the application in-process (failing inputs, API keys, a rate limit on a
clock the test moves), and the web page in headless Chromium."""

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import needs_system
from encdec.cli import main
from encdec.config import ConfigError, ServeConfig
from encdec.serve import Batcher, RateLimiter, create_app, load_api_keys
from encdec.translate import Translator

ROOT = Path(__file__).resolve().parents[1]
LIMITS = {"max_inputs": 8, "max_input_chars": 40, "max_body_bytes": 4000, "max_queue": 6,
          "max_beam": 6, "max_wait_ms": 200}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_cli(run, args: list[str], env: dict, log: Path):
    """`encdec serve RUN ARGS` on a free port, its output in ``log``; yields the base URL."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    cmd = [sys.executable, "-m", "encdec.cli", "serve", str(run), "--port", str(port),
           "--threads", "1", *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
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
            pytest.fail(f"server did not start: {log.read_text()}")
        time.sleep(0.2)
    yield base
    proc.terminate()
    proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    yield from _serve_cli(tiny_run, [f"serve.{k}={v}" for k, v in LIMITS.items()], {}, log)


KEY = "k-7f3a9c1e5b"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def keyed_server(tiny_run, tmp_path_factory):
    """A server with --api-key-file and an access log; ENCDEC_API_KEY is set too, and loses."""
    root = tmp_path_factory.mktemp("keyed")
    (root / "api-key").write_text(KEY + "\n", encoding="utf-8")
    log = root / "server.log"
    args = ["--api-key-file", str(root / "api-key"), "--access-log"]
    for base in _serve_cli(tiny_run, args, {"ENCDEC_API_KEY": "env-key-loses"}, log):
        yield base, log


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


def test_docs_are_off_and_the_page_loads_nothing_from_elsewhere(server):
    for path in ("/docs", "/redoc"):  # their pages load Swagger UI / ReDoc from a CDN
        assert error_of(httpx.get(server + path), 404) == "path"
    page = httpx.get(server + "/").text
    assert "<textarea" in page
    assert not re.search(r"https?://|(src|href|action)\s*=\s*[\"']?//", page), "an outside URL"


def test_unknown_paths_and_wrong_methods_are_json_errors(server):
    assert error_of(httpx.get(server + "/v2/translate"), 404) == "path"
    r = httpx.post(server + "/v1/health", json={})
    assert error_of(r, 405) == "method" and r.headers["allow"] == "GET"
    assert error_of(httpx.get(server + "/v1/translate"), 405) == "method"


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
    for undecodable in (b'\xff\xfe{}', b'\xff\xfe\x00'):  # the second FastAPI calls a 400
        r = httpx.post(server + "/v1/translate", content=undecodable,
                       headers={"content-type": "application/json"})
        assert error_of(r, 422) == "body"
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


# ---- the application in-process ---------------------------------------------------------------

@pytest.fixture(scope="module")
def translator(tiny_run):
    return Translator.from_run(tiny_run)


def call(app, *requests, client=("127.0.0.1", 5000)):
    """Send (method, path, httpx keywords) requests to ``app`` at once; the responses in order."""
    async def send_all():
        transport = httpx.ASGITransport(app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await asyncio.gather(*(http.request(m, p, **kw) for m, p, kw in requests))
    return asyncio.run(send_all())


def translate_request(inputs, headers=None):
    return ("POST", "/v1/translate", {"json": {"inputs": inputs}, "headers": headers or {}})


def test_a_failing_input_fails_only_its_own_request(translator, monkeypatch):
    words = ["abc", "hgfe", "a"]
    expected = translator.translate(words)
    real, batches = translator.translate_nbest, []

    def fails_on_boom(texts, **kw):
        batches.append(list(texts))
        if "boom" in texts:
            raise RuntimeError("the model choked")
        return real(texts, **kw)

    monkeypatch.setattr(translator, "translate_nbest", fails_on_boom)
    app = create_app(translator, ServeConfig(max_wait_ms=500))
    first, bad, last = call(app, translate_request(words[:1]), translate_request(["ab", "boom"]),
                            translate_request(words[1:]))
    assert sorted(batches[0]) == sorted(words + ["ab", "boom"])  # the three shared a batch
    assert first.status_code == 200 and first.json()["outputs"] == expected[:1]
    assert last.status_code == 200 and last.json()["outputs"] == expected[1:]
    assert error_of(bad, 500) == "inputs[1]"
    assert "RuntimeError" in bad.json()["error"]["message"]
    again, = call(app, translate_request(words))
    assert again.json()["outputs"] == expected


def test_an_unexpected_error_is_a_json_500(translator, monkeypatch):
    def broken(**overrides):
        raise KeyError("surprise")

    monkeypatch.setattr(translator, "decode_config", broken)
    r, = call(create_app(translator, ServeConfig()), translate_request(["abc"]))
    assert r.status_code == 500 and r.json()["error"]["field"] is None
    assert "server log" in r.json()["error"]["message"]


def test_api_keys_guard_everything_but_health_and_the_page(translator):
    app = create_app(translator, ServeConfig(), api_keys=[KEY, "second-key"])
    open_, page, none, wrong, basic, spec, ok, second = call(
        app, ("GET", "/v1/health", {}), ("GET", "/", {}), translate_request(["abc"]),
        translate_request(["abc"], {"Authorization": "Bearer wrong"}),
        ("GET", "/v1/model", {"headers": {"Authorization": f"Basic {KEY}"}}),
        ("GET", "/openapi.json", {}), translate_request(["abc"], AUTH),
        ("GET", "/v1/model", {"headers": {"authorization": "bearer second-key"}}))
    assert open_.status_code == 200 and page.status_code == 200
    for r in (none, wrong, basic, spec):
        assert error_of(r, 401) == "authorization" and r.headers["www-authenticate"] == "Bearer"
    assert "Bearer" in none.json()["error"]["message"]
    assert "not valid" in wrong.json()["error"]["message"]
    assert none.headers["connection"] == "close"  # its body was never read
    assert ok.status_code == 200 and ok.json()["outputs"] == translator.translate(["abc"])
    assert second.status_code == 200 and KEY not in second.text and "second-key" not in second.text


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_rate_limit_per_key_then_per_address_with_retry_after(translator):
    clock = Clock()
    app = create_app(translator, ServeConfig(rate_limit=0.5, rate_burst=2, rate_hold_s=0),
                     api_keys=[KEY, "second-key"], clock=clock)

    def model(headers=AUTH, client=("127.0.0.1", 5000)):
        return call(app, ("GET", "/v1/model", {"headers": headers}), client=client)[0]

    assert [model().status_code for _ in range(2)] == [200, 200]  # the burst
    r = model()
    assert error_of(r, 429) == "rate" and r.headers["retry-after"] == "2"  # 1 token at 0.5/s
    clock.now += 1.5  # 0.75 tokens
    assert model().headers["retry-after"] == "1"  # 0.5 s, rounded up
    clock.now += 0.5
    assert model().status_code == 200 and model().status_code == 429
    # By key, not address: the same key elsewhere is still limited, another key is not.
    assert model(client=("10.0.0.9", 1)).status_code == 429
    assert model({"Authorization": "Bearer second-key"}).status_code == 200
    # Without a valid key, by address: guessing keys is limited too.
    elsewhere = ("10.0.0.7", 1)
    assert [model({}, elsewhere).status_code for _ in range(3)] == [401, 401, 429]
    health = call(app, *[("GET", "/v1/health", {})] * 5, client=elsewhere)
    assert all(r.status_code == 200 for r in health)  # liveness probes are never limited


def test_a_429_is_held_and_its_retry_after_counts_from_then(translator):
    clock = Clock()
    app = create_app(translator, ServeConfig(rate_limit=0.2, rate_burst=1, rate_hold_s=0.3),
                     clock=clock)
    assert call(app, ("GET", "/v1/model", {}))[0].status_code == 200
    clock.now += 0.9  # 0.18 tokens: the next one in 4.1 s
    t0 = time.monotonic()
    r, = call(app, ("GET", "/v1/model", {}))
    assert time.monotonic() - t0 >= 0.25  # held, so a retry loop slows down
    assert error_of(r, 429) == "rate"
    assert r.headers["retry-after"] == "4"  # 4.1 - 0.3 s held, rounded up (not 5)


def test_rate_limiter_forgets_idle_clients_and_stays_bounded():
    clock = Clock()
    limiter = RateLimiter(rate=1.0, burst=4, clock=clock, max_clients=100)
    assert [limiter.take("x") for _ in range(5)] == [0, 0, 0, 0, 1.0]
    for i in range(50):
        assert limiter.take(f"c{i}") == 0
    clock.now += 2
    assert limiter.take("y") == 0 and len(limiter) == 52  # nobody idle for burst / rate yet
    assert [limiter.take("x") for _ in range(3)] == [0, 0, 1.0]  # 2 tokens came back
    clock.now += 4  # every bucket is full again: the same as no bucket
    assert limiter.take("z") == 0 and len(limiter) == 1
    for i in range(300):
        limiter.take(f"d{i}")
    assert len(limiter) == 100


def test_api_keys_come_from_a_file_or_the_environment(tmp_path, capsys, tiny_run):
    keys = tmp_path / "keys"
    keys.write_text("alpha\n\n beta \n", encoding="utf-8")
    assert load_api_keys(str(keys), {"ENCDEC_API_KEY": "gamma"}) == ["alpha", "beta"]  # file wins
    assert load_api_keys(None, {"ENCDEC_API_KEY": "gamma"}) == ["gamma"]
    assert load_api_keys(None, {}) == []
    empty = tmp_path / "empty"
    empty.write_text("\n", encoding="utf-8")
    for bad in (empty, tmp_path / "missing"):
        with pytest.raises(ConfigError, match=re.escape(str(bad))):
            load_api_keys(str(bad), {})
    with pytest.raises(ConfigError, match="ENCDEC_API_KEY"):
        load_api_keys(None, {"ENCDEC_API_KEY": " "})
    # `encdec serve` refuses to start, naming the file, before it loads the model.
    assert main(["serve", str(tiny_run), "--api-key-file", str(empty)]) == 2
    assert str(empty) in capsys.readouterr().err


def test_the_command_line_takes_an_api_key_file(keyed_server):
    base, log = keyed_server
    assert httpx.get(base + "/v1/health").status_code == 200
    assert error_of(post(base, {"inputs": ["abc"]}), 401) == "authorization"
    from_env = post(base, {"inputs": ["abc"]}, headers={"Authorization": "Bearer env-key-loses"})
    assert error_of(from_env, 401) == "authorization"  # --api-key-file wins over ENCDEC_API_KEY
    assert post(base, {"inputs": ["abc"]}, headers=AUTH).status_code == 200
    info = httpx.get(base + "/v1/model", headers=AUTH)
    assert info.status_code == 200 and KEY not in info.text
    time.sleep(0.2)  # the access log is written after the response
    assert "POST /v1/translate" in log.read_text() and KEY not in log.read_text()


# ---- the web page ------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@needs_system([] if CHROMIUM else ["chromium"], "the web page test")
def test_web_page_shows_outputs_and_heat_map(server):
    from playwright import sync_api  # pinned in the Makefile: missing is an error
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


@needs_system([] if CHROMIUM else ["chromium"], "the web page test")
def test_web_page_sends_the_api_key(keyed_server):
    base, _ = keyed_server
    from playwright import sync_api  # pinned in the Makefile: missing is an error
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('API key')")
            page.fill("#api_key", KEY)
            page.dispatch_event("#api_key", "change")
            page.wait_for_function("document.getElementById('model').textContent.includes('transformer')")
            page.fill("#inputs", "abc")
            page.click("#go")
            page.wait_for_selector(".hyp")
            expected = post(base, {"inputs": ["abc"]}, headers=AUTH).json()["outputs"][0]
            assert page.locator(".hyp .text").nth(0).inner_text() == expected
        finally:
            browser.close()
