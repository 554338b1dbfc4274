"""POST /v1/translate on a text run: texts in, n-best outputs with scores (and attention)
out."""

import re
import time
from typing import Annotated, Literal

from encdec.config import ConfigError, ServeConfig
from encdec.serve.batching import Batcher, RequestError, _decoded
from encdec.translate import Translator

_REQUEST_TO_DECODE = {"beam": "beam_size", "method": "method", "nbest": "nbest",
                      "length_penalty": "length_penalty", "temperature": "temperature",
                      "top_k": "top_k", "top_p": "top_p", "iterations": "iterations",
                      "length_beam": "length_beam", "length_scale": "length_scale",
                      "early_exit": "early_exit"}
_DECODE_TO_REQUEST = {v: k for k, v in _REQUEST_TO_DECODE.items()}


def add_translate(app, translator: Translator, cfg: ServeConfig, batcher: Batcher) -> None:
    """POST /v1/translate on ``app``, decoding with ``batcher``."""
    from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

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
    app.state.request_fields = list(TranslateRequest.model_fields)
    app.post("/v1/translate", response_model=TranslateResponse, responses={
        413: {"description": "too many inputs, an input or the body too long"},
        422: {"description": "a field is missing, of the wrong type or out of range; "
                             "malformed JSON"},
        503: {"description": "the queue is full; retry after a second"}})(translate)
