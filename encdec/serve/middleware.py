"""ASGI middleware in front of the application, outermost first: ``Guard`` (an unhandled
exception becomes a JSON 500), ``Gate`` (API keys: 401; per-client rate limit: 429) and
``BodyLimit`` (413); the JSON error form every refusal shares."""

import asyncio
import collections
import hmac
import json
import logging
import math
import time

log = logging.getLogger("encdec.serve")


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes, by their Content-Length
    before anything is read, or (chunked uploads) as soon as the bytes read pass the limit."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _send_error(send, 413, "body", f"the request body is {length.decode()} "
                                     f"bytes; the limit is {self.limit}", close=True)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _send_error(send, 413, "body",
                                         f"the request body exceeds {self.limit} bytes",
                                         close=True)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class RateLimiter:
    """A token bucket per client: ``rate`` requests per second on average, up to ``burst`` at
    once. ``take`` answers 0 (go ahead) or the seconds until the client's next token.

    The table stays bounded: a bucket idle for burst / rate seconds is full again, exactly like
    a new one, so it is dropped; past ``max_clients`` buckets the least recently used goes too
    (its client starts again with a full bucket: lenient, but memory cannot grow)."""

    def __init__(self, rate: float, burst: int, clock=time.monotonic, max_clients: int = 100_000):
        self.rate, self.burst, self.clock, self.max_clients = rate, burst, clock, max_clients
        # client -> (tokens, time of last request), least recently used first
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def take(self, client: str) -> float:
        now = self.clock()
        self._evict(now)
        tokens, then = self._buckets.pop(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        ok = tokens >= 1
        self._buckets[client] = (tokens - 1 if ok else tokens, now)  # now the most recent
        return 0.0 if ok else (1 - tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)

    def _evict(self, now: float) -> None:
        refill = self.burst / self.rate
        while self._buckets:
            client, (_, then) = next(iter(self._buckets.items()))  # the least recently used
            if now - then < refill and len(self._buckets) < self.max_clients:
                return
            del self._buckets[client]


class Gate:
    """ASGI middleware: the API key (401) and the per-client rate limit (429), decided from the
    headers before the body is read. GET /v1/health stays open to both (liveness probes), the
    web page to the key (it has a field to send one). Without a valid key a request counts
    against its address, so guessing keys is rate-limited too.

    A 429 is sent after up to ``hold_s`` seconds (``serve.rate_hold_s``; while fewer than
    ``max_held`` are waiting): a client that retries the moment it hears back then sends one
    request per ``hold_s`` per connection, instead of keeping the event loop, and through the GIL
    the model thread, busy with refusals (``benchmarks/serve_load.py --hostile 20
    --hostile-rate 0``, 5/s per client: good clients' p99 1.96x the quiet p99 with immediate
    429s, 1.21x with 429s held 1 s; 3.01x without a limit). A polite client loses little: it
    would wait for Retry-After anyway, and Retry-After counts from when the 429 is sent."""

    def __init__(self, app, api_keys=(), limiter: RateLimiter | None = None,
                 hold_s: float = 1.0, max_held: int = 1000):
        self.app, self.limiter = app, limiter
        self.api_keys = [k.encode() for k in api_keys]
        self.hold_s, self.max_held, self.held = hold_s, max_held, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope["method"], scope["path"]) == ("GET", "/v1/health"):
            return await self.app(scope, receive, send)
        key = self._key_index(scope)
        address = (scope.get("client") or ("unknown",))[0]
        client = f"key {key}" if key is not None else f"address {address}"
        # A refusal sent before the body is read closes the connection, as 413 does: keeping it
        # open would mean reading, then dropping, a body of whatever size the client chose.
        headers = dict(scope["headers"])
        close = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
        wait = self.limiter.take(client) if self.limiter is not None else 0.0
        if wait > 0:
            wait -= await self._hold(wait)
            retry = max(1, math.ceil(wait))
            return await _send_error(
                send, 429, "rate", f"over {self.limiter.rate:g} requests/s (bursts of "
                f"{self.limiter.burst}) from this client; retry after {retry} s",
                headers=[(b"retry-after", str(retry).encode())], close=close)
        if self.api_keys and key is None and (scope["method"], scope["path"]) != ("GET", "/"):
            given = _bearer(scope) is not None
            return await _send_error(
                send, 401, "authorization", "the API key is not valid" if given else
                "this server needs an API key: send the header 'Authorization: Bearer <key>'",
                headers=[(b"www-authenticate", b"Bearer")], close=close)
        await self.app(scope, receive, send)

    async def _hold(self, wait: float) -> float:
        """Sleep before a 429 (see the class); the seconds slept."""
        hold = min(wait, self.hold_s) if self.held < self.max_held else 0.0
        if hold > 0:
            self.held += 1
            try:
                await asyncio.sleep(hold)
            finally:
                self.held -= 1
        return hold

    def _key_index(self, scope) -> int | None:
        """Which API key the request carries, compared in constant time; None if none fits."""
        given = _bearer(scope)
        if given is None:
            return None
        matches = [i for i, key in enumerate(self.api_keys) if hmac.compare_digest(key, given)]
        return matches[0] if matches else None


def _bearer(scope) -> bytes | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any case)."""
    value = dict(scope["headers"]).get(b"authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" and token.strip() else None


class Guard:
    """ASGI middleware around everything: an exception nobody handled is logged with its
    traceback and, if no response has started, answered with a JSON 500, not a text page."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:  # noqa: BLE001 - the last place to turn it into a JSON answer
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not started:
                await _send_error(send, 500, None, "internal server error; the server log "
                                                   "has the details")


def _error_body(status: int, field: str | None, message: str) -> dict:
    return {"error": {"status": status, "field": field, "message": message}}


async def _send_error(send, status: int, field: str | None, message: str, headers=(),
                      close: bool = False) -> None:
    """A JSON error. ``close`` ends the connection: for a body we will not read (413)."""
    body = json.dumps(_error_body(status, field, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers,
                            *([(b"connection", b"close")] if close else [])]})
    await send({"type": "http.response.body", "body": body})
