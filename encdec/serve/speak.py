"""POST /v1/speak on a text-to-speech run: text in, a WAV file (or JSON with the mel frames
and durations) out."""

import io
import time
from dataclasses import asdict
from typing import Annotated, Literal

from encdec.config import ServeConfig
from encdec.serve.batching import Batcher, RequestError, _decoded

MAX_SPEAK_SCALE = 4.0  # length_scale and token_scales above this are refused (422)


def speak_info(speaker, cfg: ServeConfig, name: str, n_params: int) -> dict:
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


def add_speak(app, speaker, cfg: ServeConfig, batcher: Batcher) -> None:
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
            raise RequestError(422, field, f"this run is autoregressive "
                                           f"({speaker.cfg.model.arch}): it stops on its own; "
                                           "speed control needs a fastspeech run")
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

