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

from encdec.serve.app import create_app, load_api_keys, serve
from encdec.serve.batching import Batcher, RequestError
from encdec.serve.middleware import RateLimiter

__all__ = ["Batcher", "RateLimiter", "RequestError", "create_app", "load_api_keys", "serve"]
