"""`encdec serve`: an HTTP API over a trained run, with dynamic batching, limits and a web page.

    POST /v1/translate   {"inputs": [...], "beam": 5, "nbest": 1, "return_attention": false}
    GET  /v1/health      liveness and queue length
    GET  /v1/model       task, sizes, vocabularies, decoding defaults, limits
    GET  /               the web page (outputs and a cross-attention heat map)
    GET  /docs           OpenAPI documentation

One thread owns the model. Requests put their inputs on a queue; the thread takes the oldest
request and every queued request with the same decoding settings, up to
``serve.max_batch_size`` inputs (waiting at most ``serve.max_wait_ms`` for the batch to fill),
decodes them together and hands each request its outputs. Bad requests are answered with
413/422/503 and a JSON error naming the field; they never reach the model.
"""


import asyncio
import collections
import contextlib
import json
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from encdec.config import ConfigError, ServeConfig
from encdec.translate import Translator


class RequestError(Exception):
    """A request the server refuses: HTTP status, the field at fault, and why."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


# ---- dynamic batching --------------------------------------------------------------------------

@dataclass
class _Job:
    texts: list[str]
    settings: tuple  # decoding settings as sorted (name, value) pairs; equal settings batch
    done: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)
    result: list | None = None
    error: Exception | None = None
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

    def submit(self, texts: list[str], settings: dict, on_done) -> _Job:
        job = _Job(list(texts), tuple(sorted(settings.items())), on_done=on_done)
        with self._cond:
            if self.queued_inputs + len(texts) > self.cfg.max_queue:
                raise RequestError(503, "inputs", f"the server is busy: {self.queued_inputs} "
                                   f"inputs are queued (limit {self.cfg.max_queue}); retry later")
            self._queue.append(job)
            self.queued_inputs += len(texts)
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
                size = sum(len(j.texts) for j in self._queue if j.settings == key)
                left = deadline - time.monotonic()
                if size >= limit or left <= 0:
                    break
                self._cond.wait(left)
            batch, size = [], 0
            for job in list(self._queue):
                if job.settings != key:
                    continue
                if batch and size + len(job.texts) > limit:
                    break
                batch.append(job)
                size += len(job.texts)
            for job in batch:
                self._queue.remove(job)
                self.queued_inputs -= len(job.texts)
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
                        503, "inputs", f"queued for more than {self.cfg.request_timeout_s:g} s; "
                                       "the server is overloaded, retry later"))
                else:
                    live.append(job)
            if not live:
                continue
            settings = dict(live[0].settings)
            texts = [t for job in live for t in job.texts]
            try:
                warnings: list[tuple[int, str]] = []
                need_attention = settings.pop("return_attention")
                results = self.translator.translate_nbest(
                    texts, need_attention=need_attention,
                    warn=lambda i, m: warnings.append((i, m)), **settings)
            except Exception as err:  # noqa: BLE001 - reported to the waiting requests
                for job in live:
                    self._finish(job, error=err)
                continue
            self.batches += 1
            self.decoded_inputs += len(texts)
            start = 0
            for job in live:
                n = len(job.texts)
                job_warnings = [(i - start, m) for i, m in warnings if start <= i < start + n]
                self._finish(job, result=(results[start:start + n], job_warnings, len(texts)))
                start += n

    @staticmethod
    def _finish(job: _Job, result=None, error=None) -> None:
        job.result, job.error = result, error
        job.done.set()
        if job.on_done is not None:
            job.on_done()


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
                                     f"bytes; the limit is {self.limit}")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await _send_error(send, 413, "body",
                                         f"the request body exceeds {self.limit} bytes")
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


def _error_body(status: int, field: str, message: str) -> dict:
    return {"error": {"status": status, "field": field, "message": message}}


async def _send_error(send, status: int, field: str, message: str) -> None:
    body = json.dumps(_error_body(status, field, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


_REQUEST_TO_DECODE = {"beam": "beam_size", "method": "method", "nbest": "nbest",
                      "length_penalty": "length_penalty", "temperature": "temperature",
                      "top_k": "top_k", "top_p": "top_p", "iterations": "iterations",
                      "length_beam": "length_beam", "length_scale": "length_scale",
                      "early_exit": "early_exit"}
_DECODE_TO_REQUEST = {v: k for k, v in _REQUEST_TO_DECODE.items()}


def create_app(translator: Translator, cfg: ServeConfig | None = None, name: str = "encdec"):
    """The FastAPI application serving ``translator``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

    cfg = cfg or translator.cfg.serve
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

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="encdec", version="1", summary=f"Sequence-to-sequence model {name}",
                  lifespan=lifespan)
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
                message = f"unknown field; known: {', '.join(TranslateRequest.model_fields)}"
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
        return {
            "name": name, "task": meta.get("name"), "metric": meta.get("metric"),
            "checkpoint": translator.checkpoint_dir.name, "arch": model_cfg.arch,
            "parameters": n_params, "d_model": model_cfg.d_model, "n_heads": model_cfg.n_heads,
            "enc_layers": model_cfg.enc_layers, "dec_layers": model_cfg.dec_layers,
            "src_vocab_size": meta.get("src_vocab_size"),
            "tgt_vocab_size": meta.get("tgt_vocab_size"),
            "src_tokenizer": meta.get("src_tokenizer", {}).get("kind"),
            "tgt_tokenizer": meta.get("tgt_tokenizer", {}).get("kind"),
            "max_src_tokens": translator.max_src_tokens,
            "decode": asdict(translator.cfg.decode), "limits": asdict(cfg),
        }

    @app.post("/v1/translate", response_model=TranslateResponse,
              responses={413: {"description": "too many inputs, an input or the body too long"},
                         422: {"description": "a field is missing, of the wrong type or out of "
                                              "range; malformed JSON"},
                         503: {"description": "the queue is full; retry after a second"}})
    async def translate(req: TranslateRequest):
        t0 = time.perf_counter()
        settings = _check(req)
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()

        def wake():
            loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))

        job = batcher.submit(req.inputs, settings, wake)
        await waiter
        if job.error is not None:
            raise job.error
        results, warnings, batch_inputs = job.result
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

    return BodyLimit(app, cfg.max_body_bytes)


def serve(run_dir: str, *, host: str = "127.0.0.1", port: int = 8000, checkpoint_name: str = "best",
          device: str = "cpu", overrides: list[str] | None = None, access_log: bool = False,
          threads: int = 0) -> None:
    import torch
    import uvicorn

    from encdec.config import Config, apply_override

    if threads:
        torch.set_num_threads(threads)
    translator = Translator.from_run(run_dir, checkpoint_name, device)
    raw = {"serve": asdict(translator.cfg.serve)}
    for item in overrides or []:
        if not item.startswith("serve."):
            raise ConfigError(f"override {item!r}: encdec serve takes serve.* settings "
                              "(decoding settings come with each request)")
        apply_override(raw, item)
    cfg = Config.from_dict(raw, source="command line").serve
    app = create_app(translator, cfg, name=Path(run_dir).resolve().name)
    print(f"encdec: serving {run_dir} ({translator.checkpoint_dir.name}) on http://{host}:{port}/ "
          f"(API docs at /docs; batches of up to {cfg.max_batch_size}, "
          f"wait {cfg.max_wait_ms:g} ms)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=access_log,
                timeout_graceful_shutdown=5)
