"""The application: FastAPI behind the middlewares, with the routes every run has
(the web page, /v1/health, /v1/model, JSON errors) and the one its modality adds; and
`encdec serve`, which loads a run and runs it under uvicorn."""

import contextlib
import json
import os
import time
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from encdec.config import ConfigError, ServeConfig
from encdec.serve.audio import add_transcribe, audio_info, stage_info
from encdec.serve.batching import Batcher, RequestError
from encdec.serve.middleware import BodyLimit, Gate, Guard, RateLimiter, _error_body
from encdec.serve.speak import add_speak, speak_info
from encdec.serve.text import add_translate
from encdec.translate import Translator


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
                known = getattr(app.state, "request_fields", ())
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
            return speak_info(translator, cfg, name, n_params)
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
            info.update(audio_info(translator, cfg))
        if then is not None:
            info["stages"] = [stage_info(translator), stage_info(then)]
        return info


    if speech:
        add_transcribe(app, translator, cfg, batcher, then, then_batcher)
    elif tts:
        add_speak(app, translator, cfg, batcher)
    else:
        add_translate(app, translator, cfg, batcher)
    limiter = RateLimiter(cfg.rate_limit, cfg.rate_burst, clock) if cfg.rate_limit else None
    body_limit = cfg.max_audio_bytes if speech else cfg.max_body_bytes
    return Guard(Gate(BodyLimit(app, body_limit), api_keys, limiter, cfg.rate_hold_s))


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
