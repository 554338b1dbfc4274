"""`encdec serve`: an HTTP API over a trained run, with dynamic batching, limits and a web page.

    POST /v1/translate   {"inputs": [...], "beam": 5, "nbest": 1, "return_attention": false}
    POST /v1/transcribe  speech runs, instead: an audio upload (multipart field ``file``, or the
                         body with an audio/* Content-Type) -> text, per-token times, attention;
                         with ``encdec serve ASR_RUN --then MT_RUN`` also the transcript's
                         ``translation`` by the text run (a pipeline, encdec.pipeline)
    POST /v1/speak       text-to-speech runs, instead: {"text": ..., "length_scale": 1.0} -> a
                         WAV file, or with "format": "json" the audio (base64 WAV), the mel
                         frames, the input tokens and each token's duration
    GET  /v1/health      liveness and queue length
    GET  /v1/model       task, input ("text" or "audio"), sizes, decoding defaults, limits
    GET  /               the web page (outputs, token times and an attention heat map; for a
                         TTS run the audio, its mel spectrogram and the token durations)
    GET  /openapi.json   the API description (/docs and /redoc with ``serve.docs=true``)

One thread owns the model. Requests put their inputs on a queue; the thread takes the oldest
request and every queued request with the same decoding settings, up to
``serve.max_batch_size`` inputs (waiting at most ``serve.max_wait_ms`` for the batch to fill),
decodes them together and hands each request its outputs. If a batch fails, its requests are
decoded again one at a time, so only the request whose input fails gets the 500. An audio
upload is one request whose inputs are its segments (audio longer than the recognizer's
``max_segment_s`` is cut at quiet points), batched with other uploads the same way.

In front of the application, outermost first: ``Guard`` (an exception nobody handled becomes a
JSON 500), ``Gate`` (API key: 401; per-client rate limit: 429) and ``BodyLimit`` (413). Every
refusal is JSON, ``{"error": {"status", "field", "message"}}``, and never reaches the model.
"""


import asyncio
import collections
import contextlib
import hmac
import io
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from encdec.config import ConfigError, ServeConfig
from encdec.translate import Translator

log = logging.getLogger("encdec.serve")


class RequestError(Exception):
    """A request the server refuses: HTTP status, the field at fault, and why."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


SPEAK_CHUNK = 8  # TTS runs: texts synthesized and vocoded together at most

# ---- dynamic batching --------------------------------------------------------------------------

@dataclass
class _Job:
    inputs: list  # texts, or (samples, sample_rate) audio segments
    settings: tuple  # decoding settings as sorted (name, value) pairs; equal settings batch
    input_field: str = "inputs"  # the request field the inputs came from (error messages)
    done: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    result: list | None = None
    error: Exception | None = None
    decode_s: float = 0.0  # seconds the model spent on the batch this job was decoded in
    on_done: object = None  # called (from the model thread) when result or error is set


class Batcher:
    """Merges concurrent requests into decoding batches on one model thread."""

    def __init__(self, translator: Translator, cfg: ServeConfig):
        self.translator = translator
        self.cfg = cfg
        self._queue: collections.deque[_Job] = collections.deque()
        self._cond = threading.Condition()
        self.queued_inputs = 0
        self.batches = 0
        self.decoded_inputs = 0
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="encdec-decoder", daemon=True)
        self._thread.start()

    def submit(self, inputs: list, settings: dict, on_done,
               input_field: str = "inputs") -> _Job:
        job = _Job(list(inputs), tuple(sorted(settings.items())), input_field, on_done=on_done)
        with self._cond:
            if self.queued_inputs + len(inputs) > self.cfg.max_queue:
                raise RequestError(503, input_field, f"the server is busy: {self.queued_inputs} "
                                   f"inputs are queued (limit {self.cfg.max_queue}); retry later")
            self._queue.append(job)
            self.queued_inputs += len(inputs)
            self._cond.notify()
        return job

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def _take_batch(self) -> list[_Job]:
        """Oldest job first, then later jobs with the same settings while they fit."""
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait()
            if self._stop:
                return []
            limit = self.cfg.max_batch_size
            key = self._queue[0].settings
            deadline = time.monotonic() + self.cfg.max_wait_ms / 1000
            while True:  # give concurrent requests a moment to join a batch that is not full
                size = sum(len(j.inputs) for j in self._queue if j.settings == key)
                left = deadline - time.monotonic()
                if size >= limit or left <= 0:
                    break
                self._cond.wait(left)
            batch, size = [], 0
            for job in list(self._queue):
                if job.settings != key:
                    continue
                if batch and size + len(job.inputs) > limit:
                    break
                batch.append(job)
                size += len(job.inputs)
            for job in batch:
                self._queue.remove(job)
                self.queued_inputs -= len(job.inputs)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                return
            now = time.monotonic()
            live = []
            for job in batch:
                if now - job.enqueued > self.cfg.request_timeout_s:
                    self._finish(job, error=RequestError(
                        503, job.input_field, f"queued for more than "
                        f"{self.cfg.request_timeout_s:g} s; the server is overloaded, retry later"))
                else:
                    live.append(job)
            if not live:
                continue
            inputs = [x for job in live for x in job.inputs]
            began = time.perf_counter()
            try:
                results, warnings = self._decode(inputs, live[0].settings)
            except Exception as err:  # noqa: BLE001 - one bad input must not fail the whole batch
                self._decode_apart(live, err)
                continue
            start = 0
            for job in live:
                n = len(job.inputs)
                job_warnings = [(i - start, m) for i, m in warnings if start <= i < start + n]
                job.decode_s = time.perf_counter() - began
                self._finish(job, result=(results[start:start + n], job_warnings, len(inputs)))
                start += n

    def _decode(self, inputs: list, settings: tuple) -> tuple[list, list[tuple[int, str]]]:
        """n-best lists for ``inputs`` and the warnings as (input index, message)."""
        settings = dict(settings)
        warnings: list[tuple[int, str]] = []
        speak = getattr(self.translator, "speak", None)
        if speak is not None:  # a Speaker (TTS run): texts to speech (alike settings batch)
            scales = settings.pop("token_scales")
            results = []
            for i in range(0, len(inputs), SPEAK_CHUNK):  # the vocoder's memory grows with it
                chunk = inputs[i:i + SPEAK_CHUNK]
                results += speak(chunk, token_scales=None if scales is None else
                                 [list(scales)] * len(chunk), **settings)
            self.batches += 1
            self.decoded_inputs += len(inputs)
            return results, warnings
        need_attention = settings.pop("return_attention")
        # A Transcriber (speech run) decodes audio segments; a Translator, texts.
        nbest = getattr(self.translator, "transcribe_nbest", None) or \
            self.translator.translate_nbest
        results = nbest(inputs, need_attention=need_attention,
                        warn=lambda i, m: warnings.append((i, m)), **settings)
        self.batches += 1
        self.decoded_inputs += len(inputs)
        return results, warnings

    def _decode_apart(self, jobs: list[_Job], err: Exception) -> None:
        """After a batch raised ``err``: decode each job alone, so the jobs whose inputs are
        fine get their outputs and only the failing job gets a 500 naming its input."""
        if len(jobs) == 1:  # nothing to tell apart
            self._finish(jobs[0], error=self._input_error(jobs[0], err))
            return
        for job in jobs:
            began = time.perf_counter()
            try:
                results, warnings = self._decode(job.inputs, job.settings)
            except Exception as err:  # noqa: BLE001 - reported to this request only
                self._finish(job, error=self._input_error(job, err))
            else:
                job.decode_s = time.perf_counter() - began
                self._finish(job, result=(results, warnings, len(job.inputs)))

    def _input_error(self, job: _Job, err: Exception) -> RequestError:
        """The 500 for a job that fails on its own, naming the first input that fails alone."""
        if isinstance(err, RequestError):
            return err
        from encdec.speak import SpeakError, SpeechTooLong

        if isinstance(err, SpeakError):  # the text of this request (one input per request)
            return RequestError(413 if isinstance(err, SpeechTooLong) else 422, job.input_field,
                                err.reason)
        if job.input_field != "inputs":  # an audio upload: its segments are not the client's
            log.error("decoding %s failed", job.input_field, exc_info=err)
            return RequestError(500, job.input_field, f"decoding this audio failed "
                                f"({type(err).__name__}); the server log has the details")
        field = "inputs[0]" if len(job.inputs) == 1 else "inputs"  # "inputs": only together
        for i, text in enumerate(job.inputs if len(job.inputs) > 1 else []):
            try:
                self._decode([text], job.settings)
            except Exception as one_err:  # noqa: BLE001
                field, err = f"inputs[{i}]", one_err
                break
        log.error("decoding %s failed", field, exc_info=err)
        what = "this input" if field.endswith("]") else "these inputs together"
        return RequestError(500, field, f"decoding {what} failed ({type(err).__name__}); the "
                                        "server log has the details")

    @staticmethod
    def _finish(job: _Job, result=None, error=None) -> None:
        job.result, job.error = result, error
        job.done.set()
        if job.on_done is not None:
            job.on_done()


async def _decoded(batcher: Batcher, inputs: list, settings: dict,
                   input_field: str = "inputs") -> _Job:
    """Queue ``inputs`` for the model thread and wait, without holding up the event loop, until
    they are decoded; the done job, or its RequestError raised."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def wake():
        loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))

    job = batcher.submit(inputs, settings, wake, input_field)
    await waiter
    if job.error is not None:
        raise job.error
    return job


# ---- the application ---------------------------------------------------------------------------

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


_REQUEST_TO_DECODE = {"beam": "beam_size", "method": "method", "nbest": "nbest",
                      "length_penalty": "length_penalty", "temperature": "temperature",
                      "top_k": "top_k", "top_p": "top_p", "iterations": "iterations",
                      "length_beam": "length_beam", "length_scale": "length_scale",
                      "early_exit": "early_exit"}
_DECODE_TO_REQUEST = {v: k for k, v in _REQUEST_TO_DECODE.items()}


def create_app(translator: Translator, cfg: ServeConfig | None = None, name: str = "encdec",
               api_keys: list[str] | tuple[str, ...] = (), clock=time.monotonic,
               then: Translator | None = None):
    """The ASGI application serving ``translator``: FastAPI behind the middlewares above.
    A speech run's model is served at /v1/transcribe, a text model's at /v1/translate, a
    text-to-speech run's (``translator`` an encdec.speak.Speaker) at /v1/speak.

    ``then``: a text run that translates each transcript of the speech run ``translator``
    (on its own model thread and batcher), returned as ``translation`` beside the transcript.

    ``api_keys``: when given, requests need ``Authorization: Bearer <one of them>``.
    ``clock``: seconds, for the rate limiter (tests pass their own)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr
    from starlette.exceptions import HTTPException

    cfg = cfg or translator.cfg.serve
    speech = translator.assets.speech
    tts = translator.assets.tts
    if tts and then is not None:
        raise ConfigError("a text-to-speech run cannot be the first stage of a pipeline")
    if speech and not hasattr(translator, "transcribe_nbest"):  # a Translator of a speech run
        from encdec.transcribe import Transcriber

        translator = Transcriber(translator.model, translator.assets, translator.cfg,
                                 translator.device, translator.checkpoint_dir)
    Number = Annotated[float, Field(strict=True)]

    class TranslateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        inputs: list[StrictStr] = Field(description="texts to translate, one output list each")
        beam: StrictInt | None = Field(None, ge=1, description="beam size; 1 = greedy")
        method: Literal["greedy", "beam", "sample", "nat"] | None = None
        nbest: StrictInt = Field(1, ge=1, description="outputs per input (at most beam)")
        length_penalty: Number | None = Field(None, ge=0)
        temperature: Number | None = Field(None, gt=0)
        top_k: StrictInt | None = Field(None, ge=0)
        top_p: Number | None = Field(None, gt=0, le=1)
        iterations: StrictInt | None = Field(None, ge=1, le=100,
                                             description="nat models: Mask-Predict passes")
        length_beam: StrictInt | None = Field(None, ge=1, le=16,
                                              description="nat models: candidate lengths")
        length_scale: Number | None = Field(None, gt=0, le=4,
                                            description="nat models: length multiplier")
        early_exit: StrictBool | None = Field(
            None, description="nat models: stop refining an output once a pass leaves it unchanged")
        return_attention: StrictBool = Field(False, description="cross-attention per output")

    class Hypothesis(BaseModel):
        text: str
        score: float
        tokens: list[str]
        attention: list[list[float]] | None = Field(
            None, description="(len(tokens) + 1) x len(src_tokens); the last row is for </s>")

    class Result(BaseModel):
        src_tokens: list[str]
        hypotheses: list[Hypothesis]
        warnings: list[str] = []

    class TranslateResponse(BaseModel):
        outputs: list[str]
        results: list[Result]
        decode: dict
        batch_inputs: int = Field(description="inputs decoded in the same batch as this request")
        time_ms: float

    batcher = Batcher(translator, cfg)
    then_batcher = None
    if then is not None:
        from encdec.pipeline import check_stage

        check_stage(0, translator, name)
        check_stage(1, then, str(then.checkpoint_dir.parent.parent))
        then_batcher = Batcher(then, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()
        if then_batcher is not None:
            then_batcher.close()

    # The docs pages load Swagger UI / ReDoc from a CDN: off unless asked for.
    app = FastAPI(title="encdec", version="1", summary=f"Sequence-to-sequence model {name}",
                  lifespan=lifespan, docs_url="/docs" if cfg.docs else None,
                  redoc_url="/redoc" if cfg.docs else None)
    app.state.batcher = batcher
    started = time.time()
    meta = translator.assets.meta
    model_cfg = translator.cfg.model
    n_params = sum(p.numel() for p in translator.model.parameters())

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError):
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return JSONResponse(_error_body(err.status, err.field, err.message), err.status,
                            headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException):
        """Starlette's and FastAPI's own refusals (404, 405, 400) in the house form."""
        where = f"{request.method} {request.url.path}"
        if err.status_code == 400:  # FastAPI could not read the body (not UTF-8, say): as 422
            return JSONResponse(_error_body(422, "body", f"{err.detail}: send JSON text in "
                                                         "UTF-8"), 422)
        if err.status_code == 404 and request.url.path in ("/v1/translate", "/v1/transcribe",
                                                           "/v1/speak"):
            field, message = "path", (
                "this model is a speech recognizer: it takes audio, not text; POST an audio file "
                "to /v1/transcribe" if speech else "this model speaks text (text to speech); "
                "POST JSON to /v1/speak" if tts else "this model translates text, it does not "
                "take audio or speak; POST JSON to /v1/translate")
        elif err.status_code == 404:
            field, message = "path", f"nothing at {where}; see GET /openapi.json for the API"
        elif err.status_code == 405:
            allowed = (err.headers or {}).get("Allow", "")
            field, message = "method", f"{where} is not allowed; {request.url.path} takes {allowed}"
        else:
            field, message = None, str(err.detail)
        return JSONResponse(_error_body(err.status_code, field, message), err.status_code,
                            headers=err.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception):
        """Anything unexpected: JSON here; Guard logs the traceback (Starlette re-raises it)."""
        return JSONResponse(_error_body(500, None, "internal server error; the server log has "
                                                   "the details"), 500)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        first = err.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            field, message = "body", f"malformed JSON: {first.get('msg')}"
        else:
            field = loc[0] if loc else "body"
            for part in loc[1:]:
                field += f"[{part}]" if part.isdigit() else f".{part}"
            message = first.get("msg", "invalid value")
            if first.get("type") == "extra_forbidden":
                known = getattr(app.state, "request_fields", TranslateRequest.model_fields)
                message = f"unknown field; known: {', '.join(known)}"
        return JSONResponse(_error_body(422, field, message), 422)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return resources.files("encdec").joinpath("web/index.html").read_text(encoding="utf-8")

    @app.get("/v1/health")
    async def health():
        return {"status": "ok", "queued_inputs": batcher.queued_inputs, "batches": batcher.batches,
                "decoded_inputs": batcher.decoded_inputs,
                "uptime_s": round(time.time() - started, 1)}

    @app.get("/v1/model")
    async def model_info():
        if tts:
            return _speak_info(translator, cfg, name, n_params)
        info = {
            "name": name, "task": meta.get("name"), "metric": meta.get("metric"),
            "input": "audio" if speech else "text",
            "checkpoint": translator.checkpoint_dir.name, "arch": model_cfg.arch,
            "parameters": n_params, "d_model": model_cfg.d_model, "n_heads": model_cfg.n_heads,
            "enc_layers": model_cfg.enc_layers, "dec_layers": model_cfg.dec_layers,
            "src_vocab_size": meta.get("src_vocab_size"),
            "tgt_vocab_size": meta.get("tgt_vocab_size"),
            "src_tokenizer": (meta.get("src_tokenizer") or {}).get("kind"),
            "tgt_tokenizer": (meta.get("tgt_tokenizer") or {}).get("kind"),
            "max_src_tokens": None if speech else translator.max_src_tokens,
            "decode": asdict(translator.cfg.decode), "limits": asdict(cfg),
            "engine": translator.engine, "attention": translator.engine == "encdec",
        }
        if speech:
            info.update(_audio_info(translator, cfg))
        if then is not None:
            info["stages"] = [_stage_info(translator), _stage_info(then)]
        return info

    async def translate(req: TranslateRequest):
        t0 = time.perf_counter()
        settings = _check(req)
        results, warnings, batch_inputs = (await _decoded(batcher, req.inputs, settings)).result
        out = []
        for i, nbest in enumerate(results):
            hyps = [Hypothesis(text=h.text, score=round(float(h.score), 5), tokens=h.tokens,
                               attention=(h.attention.float().tolist()
                                          if req.return_attention and h.attention is not None
                                          else None))
                    for h in nbest[: req.nbest]]
            out.append(Result(src_tokens=nbest[0].src_tokens if nbest else [], hypotheses=hyps,
                              warnings=[m for j, m in warnings if j == i]))
        return TranslateResponse(outputs=[r.hypotheses[0].text if r.hypotheses else ""
                                          for r in out],
                                 results=out, decode=settings, batch_inputs=batch_inputs,
                                 time_ms=round((time.perf_counter() - t0) * 1000, 2))

    def _check(req) -> dict:
        if not req.inputs:
            raise RequestError(422, "inputs", "give at least one input")
        if len(req.inputs) > cfg.max_inputs:
            raise RequestError(413, "inputs", f"{len(req.inputs)} inputs; the limit is "
                                              f"{cfg.max_inputs} per request")
        for i, text in enumerate(req.inputs):
            if len(text) > cfg.max_input_chars:
                raise RequestError(413, f"inputs[{i}]", f"{len(text)} characters; the limit is "
                                                        f"{cfg.max_input_chars}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(422, f"inputs[{i}]", "not valid Unicode text (a lone "
                                                        "surrogate code point)") from None
        if req.nbest > cfg.max_beam:
            raise RequestError(422, "nbest", f"nbest {req.nbest} is over this server's limit "
                                             f"of {cfg.max_beam}")
        if req.beam is not None and req.beam > cfg.max_beam:
            raise RequestError(422, "beam", f"beam {req.beam} is over this server's limit "
                                            f"of {cfg.max_beam}")
        if req.return_attention and translator.engine != "encdec":
            raise RequestError(422, "return_attention", f"this server decodes with "
                               f"{translator.engine}, which returns no attention weights; ask "
                               "for none (or serve with --engine encdec)")
        overrides = {_REQUEST_TO_DECODE[k]: getattr(req, k) for k in _REQUEST_TO_DECODE}
        try:
            decode = translator.decode_config(**overrides)
        except ConfigError as err:
            match = re.search(r"decode\.(\w+)", str(err))
            field = _DECODE_TO_REQUEST.get(match.group(1), match.group(1)) if match else "body"
            raise RequestError(422, field, str(err).replace("decode.", "")) from None
        if decode.method == "greedy" and req.nbest > 1:
            raise RequestError(422, "nbest", "nbest > 1 needs beam search (beam > 1) or sampling")
        settings = {k: getattr(decode, k) for k in _REQUEST_TO_DECODE.values()}
        settings["return_attention"] = req.return_attention
        return settings

    if speech:
        _add_transcribe(app, translator, cfg, batcher, then, then_batcher)
    elif tts:
        _add_speak(app, translator, cfg, batcher)
    else:
        app.post("/v1/translate", response_model=TranslateResponse, responses={
            413: {"description": "too many inputs, an input or the body too long"},
            422: {"description": "a field is missing, of the wrong type or out of range; "
                                 "malformed JSON"},
            503: {"description": "the queue is full; retry after a second"}})(translate)
    limiter = RateLimiter(cfg.rate_limit, cfg.rate_burst, clock) if cfg.rate_limit else None
    body_limit = cfg.max_audio_bytes if speech else cfg.max_body_bytes
    return Guard(Gate(BodyLimit(app, body_limit), api_keys, limiter, cfg.rate_hold_s))


# ---- audio uploads (speech runs) ---------------------------------------------------------------

_AUDIO_FIELDS = ("method", "beam", "ctc_weight", "attention")  # query or multipart form fields
_AUDIO_METHODS = ("greedy", "beam", "ctc")
_AUDIO_TO_DECODE = {"method": "method", "beam": "beam_size", "ctc_weight": "ctc_weight"}
MAX_ATTENTION_COLUMNS = 200  # a longer returned attention matrix is summed into wider time bins
_TRANSCRIBE_OPENAPI = {
    "parameters": [
        {"name": "attention", "in": "query", "schema": {"type": "boolean", "default": False},
         "description": "also return the attention matrix (tokens + 1 rows, time bins)"},
        {"name": "method", "in": "query", "schema": {"enum": list(_AUDIO_METHODS)}},
        {"name": "beam", "in": "query", "schema": {"type": "integer", "minimum": 1}},
        {"name": "ctc_weight", "in": "query",
         "schema": {"type": "number", "minimum": 0, "maximum": 1}}],
    "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
            "file": {"type": "string", "format": "binary"},
            "method": {"enum": list(_AUDIO_METHODS)},
            "beam": {"type": "integer"}, "ctc_weight": {"type": "number"},
            "attention": {"type": "boolean"}}}},
        "audio/*": {"schema": {"type": "string", "format": "binary"}}}}}


def _max_audio_s(cfg: ServeConfig) -> float:
    return cfg.max_audio_seconds


def _position_s(transcriber) -> float:
    """Seconds of audio per encoder position: the feature frame shift times the subsampling."""
    shift_ms = transcriber.assets.audio_front.opts.frame_shift_ms
    return shift_ms / 1000 * transcriber.cfg.model.subsampling


def _audio_info(transcriber, cfg: ServeConfig) -> dict:
    """What GET /v1/model adds for a speech run: the audio it takes, the methods it decodes
    with (those its decoding settings accept) and the audio length limit."""
    methods = []
    for method in _AUDIO_METHODS:
        try:
            transcriber.decode_config(method=method)
            methods.append(method)
        except ConfigError:
            pass
    return {"sample_rate": transcriber.sample_rate,
            "seconds_per_position": _position_s(transcriber), "methods": methods,
            "ctc": transcriber.cfg.model.ctc_weight > 0,
            "limits": {**asdict(cfg), "max_audio_seconds": _max_audio_s(cfg)}}


def _multipart(content_type: str, body: bytes) -> tuple[dict[str, str], tuple[str, bytes] | None]:
    """The form fields and the ``file`` part (its file name and bytes) of a multipart/form-data
    body, read by the standard library's MIME parser (binary parts come back byte for byte)."""
    from email import policy
    from email.parser import BytesParser

    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    message = BytesParser(policy=policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise RequestError(422, "body", "a multipart/form-data body without parts (no boundary, "
                                        "or the body does not use it); send the audio as the "
                                        "form field 'file'")
    fields, upload = {}, None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if name == "file":
            upload = (part.get_filename() or "file", data)
        elif name in _AUDIO_FIELDS:
            try:
                fields[name] = data.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise RequestError(422, name, "not UTF-8 text") from None
        else:
            raise RequestError(422, str(name), f"unknown form field; known: file, "
                                               f"{', '.join(_AUDIO_FIELDS)}")
    return fields, upload


def _audio_settings(transcriber, cfg: ServeConfig, params: dict[str, str]) -> tuple[dict, bool]:
    """The model thread's decoding settings from a request's fields (strings), validated as
    the run's decoding config, and whether the attention matrix is wanted."""
    values = {}
    for key, kind in (("method", str), ("beam", int), ("ctc_weight", float)):
        text = params.get(key, "")
        try:
            values[key] = kind(text) if text else None
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise RequestError(422, key, f"{text!r} is not {what}") from None
    if values["method"] is not None and values["method"] not in _AUDIO_METHODS:
        raise RequestError(422, "method", f"{values['method']!r}: choose one of "
                                          f"{', '.join(_AUDIO_METHODS)}")
    if values["beam"] is not None and not 1 <= values["beam"] <= cfg.max_beam:
        raise RequestError(422, "beam", f"beam {values['beam']}: give 1 to this server's limit "
                                        f"of {cfg.max_beam}")
    try:
        decode = transcriber.decode_config(**{_AUDIO_TO_DECODE[k]: v for k, v in values.items()})
    except ConfigError as err:
        match = re.search(r"decode\.(\w+)", str(err))
        field = {v: k for k, v in _AUDIO_TO_DECODE.items()}.get(match.group(1)) if match else None
        raise RequestError(422, field or "method", str(err).replace("decode.", "")) from None
    attention = params.get("attention", "").lower()
    if attention not in ("", "0", "1", "false", "true"):
        raise RequestError(422, "attention", f"{attention!r}: give 1 or 0 (true or false)")
    # Attention is always computed: the token times come from it.
    settings = {"method": decode.method, "beam_size": decode.beam_size,
                "ctc_weight": decode.ctc_weight, "return_attention": True}
    return settings, attention in ("1", "true")


def _read_upload(data: bytes, name: str, field: str, sample_rate: int,
                 cfg: ServeConfig) -> tuple:
    """The (N,) samples of an upload at ``sample_rate`` and the reader's warnings. 413 for
    more than ``serve.max_audio_seconds`` (judged from the header before decoding, where the
    format tells, so a small compressed body cannot expand into hours of samples); 422 for
    audio that cannot be used, with the reader's message naming the upload."""
    import soundfile

    from encdec.audio.io import AudioError, read_audio_bytes

    limit = _max_audio_s(cfg)

    def too_long(seconds: float) -> RequestError:
        return RequestError(413, field, f"{name}: {seconds:.1f} s of audio; this server takes at "
                                        f"most {limit:g} s per request (serve.max_audio_seconds)")

    try:
        header = soundfile.info(io.BytesIO(data))
        claimed = header.frames / header.samplerate
    except Exception:  # noqa: BLE001 - not audio, or no header: read_audio_bytes says why
        claimed = 0.0
    if claimed > limit:
        raise too_long(claimed)
    warnings: list[str] = []
    try:
        wave = read_audio_bytes(data, name, sample_rate, warn=warnings.append)
    except AudioError as err:
        raise RequestError(422, field, str(err)) from None
    if wave.numel() > limit * sample_rate:
        raise too_long(wave.numel() / sample_rate)
    return wave, warnings


def _token_starts(attention, count: int, position_s: float, start_s: float,
                  end_s: float) -> list[float]:
    """When each of the ``count`` tokens decoded from the audio segment [start_s, end_s]
    starts: at encoder positions, ``position_s`` seconds each, that rise from token to token
    and, among all rising paths, have the largest product of the tokens' rows of
    ``attention`` (cross-attention; for CTC, the token's posterior). Where each row's peak
    already rises, that is the peaks. Why not the peaks made monotone: CTC rows are per label,
    so a letter's every occurrence has the same row and peak, and all but the first would be
    pushed onto one instant; the path gives each occurrence its own peak."""
    import torch

    if count == 0 or attention.size(1) == 0:  # no tokens; audio too short for a position
        return [start_s] * count
    scores = attention[:count].float().clamp(min=1e-9).log()  # (T, S)
    strict = 1 if count <= scores.size(1) else 0  # a position per token when there are enough
    best, back = scores[0], []
    for row in scores[1:]:
        # best path ending at s' < s (strict) or s' <= s: a running max, shifted by ``strict``
        prefix, where = best.cummax(dim=0)
        if strict:
            prefix = torch.cat([prefix.new_full((1,), -math.inf), prefix[:-1]])
            where = torch.cat([where.new_zeros(1), where[:-1]])
        best = row + prefix
        back.append(where)
    positions = [int(best.argmax())]
    for where in reversed(back):
        positions.append(int(where[positions[-1]]))
    positions.reverse()
    return [min(end_s, start_s + p * position_s) for p in positions]


def _align(tokens: list[str], starts: list[float], end_s: float) -> list[dict]:
    """Time spans from the tokens' (rising) start times: each ends where the next starts, the
    last at ``end_s`` (the end of the audio)."""
    ends = starts[1:] + [end_s]
    return [{"token": t, "start_s": round(a, 3), "end_s": round(b, 3)}
            for t, a, b in zip(tokens, starts, ends)]


def _attention_matrix(parts: list[tuple[int, object]], max_columns: int = MAX_ATTENTION_COLUMNS):
    """One (tokens + 1, time bins) matrix for an upload decoded in segments, from each
    segment's token count and (tokens + 1, positions) attention: the segments' token rows
    side by side in time, then the last segment's </s> row; positions summed in groups when
    there are more than ``max_columns`` (rows still sum to 1). The matrix, rounded, and the
    positions per column."""
    import torch

    rows = sum(t for t, _ in parts) + 1
    cols = sum(a.size(1) for _, a in parts)
    matrix = torch.zeros(rows, cols)
    r = c = 0
    for t, attention in parts:
        s = attention.size(1)
        matrix[r:r + t, c:c + s] = attention[:t].float()
        r, c = r + t, c + s
    matrix[-1, c - s:] = parts[-1][1][-1].float()  # </s>, over the last segment
    group = max(1, math.ceil(cols / max_columns))
    matrix = torch.nn.functional.pad(matrix, (0, -cols % group))
    matrix = matrix.view(rows, -1, group).sum(dim=2)  # (rows, bins)
    return [[round(w, 4) for w in row] for row in matrix.tolist()], group


def _positions(transcriber, num_samples: int) -> int:
    """Encoder positions the model makes of ``num_samples`` samples: the attention columns of
    that audio (a batch's other columns are padding)."""
    import torch

    from encdec.audio.features import num_frames

    frames = num_frames(num_samples, transcriber.assets.audio_front.opts)
    return int(transcriber.model.front.output_lengths(torch.tensor([frames]))[0])


def _stage_info(translator: Translator) -> dict:
    """A pipeline stage as GET /v1/model lists it."""
    meta, model_cfg = translator.assets.meta, translator.cfg.model
    return {"run": translator.checkpoint_dir.parent.parent.name, "task": meta.get("name"),
            "input": "audio" if translator.assets.speech else "text",
            "checkpoint": translator.checkpoint_dir.name, "arch": model_cfg.arch,
            "parameters": sum(p.numel() for p in translator.model.parameters()),
            "tgt_tokenizer": (meta.get("tgt_tokenizer") or {}).get("kind"),
            "decode": asdict(translator.cfg.decode)}


def _add_transcribe(app, transcriber, cfg: ServeConfig, batcher: Batcher,
                    then: Translator | None = None, then_batcher: Batcher | None = None) -> None:
    """POST /v1/transcribe on ``app``: an audio upload in; its transcript, each token's time
    span and (``?attention=1``) the attention matrix out; with ``then``, also the transcript
    translated by that text run with its decoding defaults (``then_batcher`` decodes it)."""
    from fastapi import Request
    from pydantic import BaseModel, Field

    from encdec.audio.io import split_long

    rate, position_s = transcriber.sample_rate, _position_s(transcriber)

    class Span(BaseModel):
        token: str
        start_s: float
        end_s: float

    class TranscribeResponse(BaseModel):
        text: str
        score: float
        tokens: list[str]
        alignment: list[Span] = Field(description="each token's time span in the audio")
        duration_s: float
        decode_s: float = Field(description="seconds the model spent on the batch it was in")
        method: str
        beam: int | None = Field(description="beam search's beam size (method beam)")
        ctc_weight: float | None = Field(description="beam search's CTC weight (method beam)")
        warnings: list[str]
        attention: list[list[float]] | None = Field(
            None, description="with ?attention=1: (len(tokens) + 1) x time bins of "
                              "attention_step_s; the last row is for </s>")
        attention_step_s: float | None = None

    class PipelineResponse(TranscribeResponse):
        translation: str = Field(description="the transcript translated by the second stage")
        translation_score: float
        translation_decode_s: float = Field(description="seconds the second stage's model "
                                                        "spent on the batch it was in")

    if then is not None:
        then_decode = then.decode_config()
        then_settings = {k: getattr(then_decode, k) for k in _REQUEST_TO_DECODE.values()}
        then_settings["return_attention"] = False

    async def transcribe(request: Request):
        content_type = request.headers.get("content-type", "")
        media = content_type.partition(";")[0].strip().lower()
        if media != "multipart/form-data" and not media.startswith("audio/"):
            raise RequestError(415, "content-type", f"Content-Type {media or '(none)'} is not "
                               "audio: send the audio as the form field 'file' of a "
                               "multipart/form-data body, or as the whole body with an audio/* "
                               "Content-Type (audio/wav, audio/flac, audio/ogg, ...)")
        params = dict(request.query_params)
        for key in params:
            if key not in _AUDIO_FIELDS:
                raise RequestError(422, key, f"unknown parameter; known: "
                                             f"{', '.join(_AUDIO_FIELDS)}")
        body = await request.body()
        name, field = "the request body", "body"
        if media == "multipart/form-data":
            fields, upload = await asyncio.to_thread(_multipart, content_type, body)
            for key in fields.keys() & params.keys():
                raise RequestError(422, key, "given both as a query parameter and as a form "
                                             "field; give it once")
            if upload is None:
                raise RequestError(422, "file", "no form field 'file': send the audio as the "
                                                "form field 'file'")
            params.update(fields)
            (name, body), field = upload, "file"
        settings, want_attention = _audio_settings(transcriber, cfg, params)
        wave, warnings = await asyncio.to_thread(_read_upload, body, name, field, rate, cfg)
        duration_s = wave.numel() / rate
        cuts = split_long(wave, rate, max_seconds=transcriber.max_segment_s)
        if len(cuts) > 1:
            warnings.append(f"{name}: {duration_s:.1f} s of audio is longer than "
                            f"{transcriber.max_segment_s:g} s; decoded in {len(cuts)} segments "
                            "cut at quiet points")
        job = await _decoded(batcher, [(wave[a:b], rate) for a, b in cuts], settings, field)
        # Token times and the matrix take up to ~40 ms for a minute of audio: off the loop too.
        out = await asyncio.to_thread(answer, job, cuts, duration_s, settings, warnings,
                                      want_attention)
        if then is not None:
            job = await _decoded(then_batcher, [out.text], then_settings, field)
            (nbest,), then_warnings, _ = job.result
            out.warnings += [m for _, m in then_warnings]
            out = PipelineResponse(**dict(out), translation=nbest[0].text,
                                   translation_score=round(float(nbest[0].score), 5),
                                   translation_decode_s=round(job.decode_s, 4))
        return out

    def answer(job: _Job, cuts: list[tuple[int, int]], duration_s: float, settings: dict,
               warnings: list[str], want_attention: bool) -> TranscribeResponse:
        """The response for an upload decoded in the segments ``cuts`` (sample ranges)."""
        nbests, decode_warnings, _ = job.result
        best = [nbest[0] for nbest in nbests]
        beam_search = settings["method"] == "beam"
        alignment, parts = [], None  # parts: (tokens, (tokens + 1, positions) attention)
        if all(h.attention is not None for h in best):
            parts = [(len(h.tokens), h.attention[:, :_positions(transcriber, b - a)])
                     for (a, b), h in zip(cuts, best)]
            starts = [t for (a, b), (count, attention) in zip(cuts, parts)
                      for t in _token_starts(attention, count, position_s, a / rate, b / rate)]
            alignment = _align([t for h in best for t in h.tokens], starts, duration_s)
        out = TranscribeResponse(
            text=" ".join(h.text for h in best if h.text),
            score=round(sum(h.score for h in best), 5),
            tokens=[t for h in best for t in h.tokens], alignment=alignment,
            duration_s=round(duration_s, 3), decode_s=round(job.decode_s, 4),
            method=settings["method"], beam=settings["beam_size"] if beam_search else None,
            ctc_weight=settings["ctc_weight"] if beam_search else None,
            warnings=warnings + [m for _, m in decode_warnings])
        if want_attention and parts:
            out.attention, group = _attention_matrix(parts)
            out.attention_step_s = round(group * position_s, 4)
        return out

    app.post("/v1/transcribe", response_model=TranscribeResponse if then is None else
             PipelineResponse,
             openapi_extra=_TRANSCRIBE_OPENAPI, responses={
                 413: {"description": "the body or the audio too long"},
                 415: {"description": "not audio/* or multipart/form-data"},
                 422: {"description": "not audio, empty, NaN or too short; a field out of range"},
                 503: {"description": "the queue is full; retry after a second"}})(transcribe)


# ---- text to speech (TTS runs) -----------------------------------------------------------------

MAX_SPEAK_SCALE = 4.0  # length_scale and token_scales above this are refused (422)


def _speak_info(speaker, cfg: ServeConfig, name: str, n_params: int) -> dict:
    """GET /v1/model for a TTS run: text in, audio out, and what a request may ask for."""
    meta, model_cfg = speaker.assets.meta, speaker.cfg.model
    front = speaker.assets.audio_front.opts
    return {
        "name": name, "task": meta.get("name"), "input": "text", "output": "audio",
        "checkpoint": speaker.checkpoint_dir.name, "arch": model_cfg.arch,
        "autoregressive": speaker.autoregressive,
        "parameters": n_params, "d_model": model_cfg.d_model, "n_heads": model_cfg.n_heads,
        "enc_layers": model_cfg.enc_layers, "dec_layers": model_cfg.dec_layers,
        "src_vocab_size": meta.get("src_vocab_size"),
        "src_tokenizer": (meta.get("src_tokenizer") or {}).get("kind"),
        "sample_rate": speaker.sample_rate, "n_mels": front.num_mel_bins,
        "frame_ms": front.frame_shift_ms, "voice": meta.get("voice"),
        "length_scale": not speaker.autoregressive, "max_scale": MAX_SPEAK_SCALE,
        "limits": asdict(cfg),
    }


def _wav_bytes(audio, sample_rate: int) -> bytes:
    import soundfile

    out = io.BytesIO()
    soundfile.write(out, audio, sample_rate, format="WAV", subtype="PCM_16")
    return out.getvalue()


def _add_speak(app, speaker, cfg: ServeConfig, batcher: Batcher) -> None:
    """POST /v1/speak on ``app``: text in; a WAV file out, or (``"format": "json"``) the audio
    with its mel frames, input tokens and per-token durations for the web page."""
    import base64

    from fastapi.responses import Response
    from pydantic import BaseModel, ConfigDict, Field, StrictStr

    from encdec.speak import SpeakError

    Number = Annotated[float, Field(strict=True)]

    class SpeakRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: StrictStr = Field(description="the text to speak")
        length_scale: Number = Field(1.0, gt=0, le=MAX_SPEAK_SCALE,
                                     description="multiplies every duration; > 1 speaks slower "
                                                 "(non-autoregressive runs)")
        token_scales: list[Number] | None = Field(
            None, description="one duration factor per input token (GET /v1/model, format "
                              "json's tokens)")
        format: Literal["wav", "json"] = Field("wav", description="wav: the audio file; json: "
                                               "the audio (base64 WAV), mels and durations")

    class SpeakResponse(BaseModel):
        text: str
        tokens: list[str] = Field(description="the input tokens (phonemes or characters)")
        durations: list[int] = Field(description="frames per input token")
        frame_ms: float
        seconds: float
        sample_rate: int
        audio_wav: str = Field(description="the WAV file, base64")
        mel: list[list[float]] = Field(description="log-mel frames (frames x bins)")
        time_ms: float
        batch_inputs: int

    app.state.request_fields = list(SpeakRequest.model_fields)
    limit_s = cfg.max_audio_seconds
    frame_ms = speaker.assets.audio_front.opts.frame_shift_ms

    def check(req: SpeakRequest) -> dict:
        if not req.text.strip():
            raise RequestError(422, "text", "empty text, nothing to speak")
        if len(req.text) > cfg.max_input_chars:
            raise RequestError(413, "text", f"{len(req.text)} characters; the limit is "
                                            f"{cfg.max_input_chars}")
        try:
            req.text.encode("utf-8")
        except UnicodeEncodeError:
            raise RequestError(422, "text", "not valid Unicode text (a lone surrogate code "
                                            "point)") from None
        try:
            ids = speaker.input_ids(req.text)
        except SpeakError as err:
            raise RequestError(422, "text", err.reason) from None
        if speaker.autoregressive and (req.length_scale != 1.0 or req.token_scales):
            field = "token_scales" if req.token_scales else "length_scale"
            raise RequestError(422, field, "this run is autoregressive (transformer_tts): it "
                                           "stops on its own; speed control needs a fastspeech run")
        scales = None
        if req.token_scales is not None:
            if len(req.token_scales) != len(ids):
                raise RequestError(422, "token_scales", f"{len(req.token_scales)} factors for "
                                   f"{len(ids)} input tokens ({' '.join(speaker.tokens(req.text))})")
            for i, x in enumerate(req.token_scales):
                if not 0 < x <= MAX_SPEAK_SCALE:
                    raise RequestError(422, f"token_scales[{i}]", f"{x} is out of range: give "
                                       f"a factor above 0 and at most {MAX_SPEAK_SCALE:g}")
            scales = tuple(req.token_scales)
        return {"length_scale": req.length_scale, "token_scales": scales,
                "max_seconds": limit_s}

    async def speak(req: SpeakRequest):
        t0 = time.perf_counter()
        settings = check(req)
        job = await _decoded(batcher, [req.text], settings, input_field="text")
        [speech], _, batch_inputs = job.result
        wav = _wav_bytes(speech.audio, speech.sample_rate)
        time_ms = round((time.perf_counter() - t0) * 1000, 2)
        if req.format == "wav":
            return Response(wav, media_type="audio/wav", headers={
                "X-Encdec-Seconds": f"{speech.seconds:.3f}", "X-Encdec-Time-Ms": f"{time_ms}",
                "Content-Disposition": 'inline; filename="speech.wav"'})
        return SpeakResponse(
            text=req.text, tokens=speech.tokens, durations=speech.durations, frame_ms=frame_ms,
            seconds=round(speech.seconds, 4), sample_rate=speech.sample_rate,
            audio_wav=base64.b64encode(wav).decode("ascii"),
            mel=speech.mels.round(2).tolist(), time_ms=time_ms, batch_inputs=batch_inputs)

    app.post("/v1/speak", response_model=SpeakResponse, responses={
        200: {"content": {"audio/wav": {}}, "description": "the WAV file (format wav, the "
              "default), or the JSON below (format json)"},
        413: {"description": "the text too long, or its speech longer than "
                             "serve.max_audio_seconds"},
        422: {"description": "empty text, symbols the run never saw, a field out of range; "
                             "malformed JSON"},
        503: {"description": "the queue is full; retry after a second"}})(speak)


def load_api_keys(key_file: str | None, environ=os.environ) -> list[str]:
    """The API keys: one per line of ``key_file`` (blank lines skipped), else the one in
    $ENCDEC_API_KEY, else none (no authentication). The file wins over the variable."""
    if key_file is not None:
        try:
            text = Path(key_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            why = err.strerror if isinstance(err, OSError) else "not UTF-8 text"
            raise ConfigError(f"--api-key-file {key_file}: cannot read it ({why})") from None
        keys = [line.strip() for line in text.splitlines() if line.strip()]
        if not keys:
            raise ConfigError(f"--api-key-file {key_file}: the file is empty; put one API key "
                              "per line")
    elif "ENCDEC_API_KEY" in environ:
        keys = [environ["ENCDEC_API_KEY"].strip()]
        if not keys[0]:
            raise ConfigError("ENCDEC_API_KEY is set but empty; unset it to serve without an "
                              "API key, or give the key")
    else:
        return []
    source = f"--api-key-file {key_file}" if key_file is not None else "ENCDEC_API_KEY"
    for key in keys:  # header values are ASCII; a key no client can send would lock all out
        if not key.isascii() or not key.isprintable() or " " in key:
            raise ConfigError(f"{source}: an API key must be printable ASCII without spaces")
    return keys


def _is_tts_run(run_dir: str) -> bool:
    try:
        meta = json.loads((Path(run_dir) / "data" / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # Translator.from_run says what is wrong with the run
    return meta.get("modality") == "tts"


def serve(run_dir: str, *, host: str = "127.0.0.1", port: int = 8000, checkpoint_name: str = "best",
          device: str = "cpu", overrides: list[str] | None = None, access_log: bool = False,
          threads: int = 0, api_key_file: str | None = None, then: str | None = None,
          engine: str = "encdec", export_dir: str | None = None) -> None:
    import torch
    import uvicorn

    from encdec.config import Config, apply_override

    api_keys = load_api_keys(api_key_file)  # before the model loads: fail fast
    if threads:
        torch.set_num_threads(threads)
    if _is_tts_run(run_dir):
        from encdec.speak import Speaker

        if then is not None or engine != "encdec":
            raise ConfigError(f"{run_dir} is a text-to-speech run: serve it alone (no --then), "
                              "with --engine encdec")
        translator = Speaker.from_run(run_dir, checkpoint_name, device)
    else:
        translator = Translator.from_run(run_dir, checkpoint_name, device, engine=engine,
                                         export_dir=export_dir)
    second = None
    if then is not None:  # a pipeline: the speech run, then a text run on its transcripts
        from encdec.pipeline import check_stage

        check_stage(0, translator, run_dir)  # before the second run loads
        second = Translator.from_run(then, checkpoint_name, device)
        check_stage(1, second, then)
    raw = {"serve": asdict(translator.cfg.serve)}
    for item in overrides or []:
        if not item.startswith("serve."):
            raise ConfigError(f"override {item!r}: encdec serve takes serve.* settings "
                              "(decoding settings come with each request)")
        apply_override(raw, item)
    cfg = Config.from_dict(raw, source="command line").serve
    app = create_app(translator, cfg, name=Path(run_dir).resolve().name, api_keys=api_keys,
                     then=second)
    docs = "/openapi.json, /docs" if cfg.docs else "/openapi.json"
    auth = f"{len(api_keys)} API key(s)" if api_keys else "no API key"  # never the keys
    rate = f"{cfg.rate_limit:g}/s per client" if cfg.rate_limit else "off"
    what = f"{run_dir} then {then}" if then else run_dir
    if getattr(translator, "search", None) is not None:
        what += f" with {translator.engine} ({translator.search.export_dir})"
    print(f"encdec: serving {what} ({translator.checkpoint_dir.name}) on http://{host}:{port}/ "
          f"(API at {docs}; {auth}; rate limit {rate}; batches of up to {cfg.max_batch_size}, "
          f"wait {cfg.max_wait_ms:g} ms)", flush=True)
    # Access lines are logged at INFO: at "warning" --access-log would print nothing.
    uvicorn.run(app, host=host, port=port, log_level="info" if access_log else "warning",
                access_log=access_log, timeout_graceful_shutdown=5)
