"""POST /v1/transcribe on a speech run: audio uploads in, transcripts with token times and
attention out (and, in a pipeline, their translations)."""

import asyncio
import io
import math
import re
from dataclasses import asdict

from encdec.config import ConfigError, ServeConfig
from encdec.serve.batching import Batcher, RequestError, _decoded, _Job
from encdec.serve.text import _REQUEST_TO_DECODE
from encdec.translate import Translator

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


def audio_info(transcriber, cfg: ServeConfig) -> dict:
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


def stage_info(translator: Translator) -> dict:
    """A pipeline stage as GET /v1/model lists it."""
    meta, model_cfg = translator.assets.meta, translator.cfg.model
    return {"run": translator.checkpoint_dir.parent.parent.name, "task": meta.get("name"),
            "input": "audio" if translator.assets.speech else "text",
            "checkpoint": translator.checkpoint_dir.name, "arch": model_cfg.arch,
            "parameters": sum(p.numel() for p in translator.model.parameters()),
            "tgt_tokenizer": (meta.get("tgt_tokenizer") or {}).get("kind"),
            "decode": asdict(translator.cfg.decode)}


def add_transcribe(app, transcriber, cfg: ServeConfig, batcher: Batcher,
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

