"""Dynamic batching: one thread owns the model; requests queue their inputs and are decoded
together with other requests of the same decoding settings."""

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

from encdec.config import ServeConfig
from encdec.translate import Translator

log = logging.getLogger("encdec.serve")


class RequestError(Exception):
    """A request the server refuses: HTTP status, the field at fault, and why."""

    def __init__(self, status: int, field: str, message: str):
        super().__init__(message)
        self.status, self.field, self.message = status, field, message


SPEAK_CHUNK = 8  # TTS runs: texts synthesized and vocoded together at most


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

