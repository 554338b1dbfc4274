"""`encdec serve` on a text run through a real HTTP client against a server on a free loopback
port (limits, errors, batching under concurrent clients, API keys from a file), and the web
page in headless Chromium."""

import json
import re
import threading
import time

import httpx
import pytest

from conftest import needs_system
from encdec.cli import main
from encdec.config import ConfigError
from encdec.serve import load_api_keys
from encdec.translate import Translator
from serving import AUTH, CHROMIUM, KEY, error_of, serve_cli

LIMITS = {"max_inputs": 8, "max_input_chars": 40, "max_body_bytes": 4000, "max_queue": 6,
          "max_beam": 6, "max_wait_ms": 200}


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    yield from serve_cli(tiny_run, [f"serve.{k}={v}" for k, v in LIMITS.items()], {}, log)


@pytest.fixture(scope="module")
def keyed_server(tiny_run, tmp_path_factory):
    """A server with --api-key-file and an access log; ENCDEC_API_KEY is set too, and loses."""
    root = tmp_path_factory.mktemp("keyed")
    (root / "api-key").write_text(KEY + "\n", encoding="utf-8")
    log = root / "server.log"
    args = ["--api-key-file", str(root / "api-key"), "--access-log"]
    for base in serve_cli(tiny_run, args, {"ENCDEC_API_KEY": "env-key-loses"}, log):
        yield base, log


def post(base, body, **kw):
    return httpx.post(base + "/v1/translate", json=body, timeout=30, **kw)




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
