"""What stands in front of every endpoint (`encdec/serve/middleware.py`), in-process: API keys,
a per-key then per-address rate limit on a clock the test moves, and a JSON 500 for an
unexpected error."""

import time

import pytest

from encdec.config import ServeConfig
from encdec.serve import RateLimiter, create_app
from encdec.translate import Translator
from serving import AUTH, KEY, call, error_of, translate_request


@pytest.fixture(scope="module")
def translator(tiny_run):
    return Translator.from_run(tiny_run)


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
