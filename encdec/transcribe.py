"""`encdec transcribe RUN FILE|DIR ...` and the Python API for speech runs:

    tr = Transcriber.from_run("runs/asr-small")
    tr.transcribe(["a.wav", "b.flac"])                  # file paths
    tr.transcribe([(samples, 44100)])                    # arrays with their sample rate
    tr.transcribe(["a.wav"], method="ctc")               # CTC best path (the speech NAT)
    tr.transcribe(["a.wav"], beam_size=10, ctc_weight=0.3)  # joint CTC/attention beam

Any format libsndfile reads (WAV, FLAC, OGG, ...), any rate (resampled), several channels
(averaged). Audio longer than ``max_segment_s`` is decoded in segments cut at quiet points.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

from encdec.audio.io import AudioError, check_samples, read_audio
from encdec.config import ConfigError
from encdec.decoding.audio import decode_audio
from encdec.decoding.texts import Translation
from encdec.translate import Translator

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au", ".w64")


class Transcriber(Translator):
    """A trained speech recognizer with its audio front, tokenizer and decoding defaults."""

    max_segment_s = 15.0  # longer audio is cut at quiet points (training audio is <= 12 s)

    @classmethod
    def from_run(cls, run_dir, checkpoint_name: str = "best", device: str = "cpu"):
        tr = super().from_run(run_dir, checkpoint_name, device)
        if not tr.assets.speech:
            raise ConfigError(f"{run_dir} is a text model: use encdec translate (or Translator)")
        return tr

    @property
    def sample_rate(self) -> int:
        return self.assets.audio_front.sample_rate

    def load(self, item, name: str = "<array>", warn=None) -> torch.Tensor:
        """One input as (N,) samples at the model's rate: a path, or (samples, sample_rate)."""
        if isinstance(item, (str, Path)):
            return read_audio(item, self.sample_rate, warn=warn) if warn else \
                read_audio(item, self.sample_rate)
        if isinstance(item, tuple) and len(item) == 2:
            samples, rate = item
            samples = samples.numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
            if samples.ndim == 2:  # (N, channels) or (channels, N): mix to mono
                samples = samples.mean(axis=1 if samples.shape[0] > samples.shape[1] else 0)
            return check_samples(samples, int(rate), self.sample_rate, name)
        raise AudioError(f"{name}: expected a file path or a (samples, sample_rate) pair, got "
                         f"{type(item).__name__}")

    def transcribe_nbest(self, inputs: list, need_attention: bool = False, progress=None,
                         warn=None, **decode_overrides) -> list[list[Translation]]:
        cfg = self.decode_config(**decode_overrides)
        waves = [self.load(x, x if isinstance(x, (str, Path)) else f"input {i}")
                 for i, x in enumerate(inputs)]
        return decode_audio(self.model, waves, cfg=cfg, device=self.device,
                            need_attention=need_attention, max_segment_s=self.max_segment_s,
                            progress=progress, warn=warn, **self.assets.audio_kwargs())

    def transcribe(self, inputs: list, **decode_overrides) -> list[str]:
        """The best transcript of each input, in input order."""
        return [n[0].text for n in self.transcribe_nbest(inputs, **decode_overrides)]


def expand_inputs(paths: list[str]) -> list[Path]:
    """Files as given; directories replaced by the audio files in them (sorted, recursive)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise AudioError(f"{p}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in it")
            files.extend(found)
        else:
            files.append(p)
    return files


def audio_batches(tr, files: list[Path], batch_files: int, bar, failures: list):
    """(files, waveforms), ``batch_files`` files at a time. A file that cannot be read is
    reported on stderr, appended to ``failures``, counted on ``bar`` and skipped."""
    from tqdm import tqdm

    for start in range(0, len(files), batch_files):
        chunk, waves = [], []
        for f in files[start:start + batch_files]:
            try:
                waves.append(tr.load(f, warn=lambda m: tqdm.write(f"encdec: warning: {m}",
                                                                  file=sys.stderr)))
                chunk.append(f)
            except AudioError as err:
                tqdm.write(f"encdec: error: {err}", file=sys.stderr)
                failures.append(f)
                bar.update(1)
        if waves:
            yield chunk, waves


def run_cli(run_dir: str, paths: list[str], *, checkpoint_name: str, output_path: str | None,
            device: str, overrides: dict, progress: bool = True, batch_files: int = 64) -> None:
    """Print ``FILE<TAB>transcript`` per input file; the real-time factor at the end.

    A file that cannot be read is reported (stderr) and skipped; the exit status then says
    so. Files are read and decoded ``batch_files`` at a time, so memory stays flat."""
    from tqdm import tqdm

    tr = Transcriber.from_run(run_dir, checkpoint_name, device)
    cfg = tr.decode_config(**overrides)  # bad settings fail before any audio is read
    files = expand_inputs(paths)
    out = open(output_path, "w", encoding="utf-8") if output_path else sys.stdout
    audio_s = decode_s = 0.0
    failures: list = []
    try:
        with tqdm(total=len(files), unit="file", file=sys.stderr, disable=not progress) as bar:
            for chunk, waves in audio_batches(tr, files, batch_files, bar, failures):
                began = time.perf_counter()
                results = decode_audio(tr.model, waves, cfg=cfg, device=tr.device,
                                       max_segment_s=tr.max_segment_s, progress=bar.update,
                                       warn=lambda i, m: tqdm.write(
                                           f"encdec: warning: {chunk[i]}: {m}", file=sys.stderr),
                                       **tr.assets.audio_kwargs())
                decode_s += time.perf_counter() - began
                audio_s += sum(w.numel() for w in waves) / tr.sample_rate
                for f, nbest in zip(chunk, results):
                    out.write(f"{f}\t{nbest[0].text}\n")
                out.flush()
    finally:
        if output_path:
            out.close()
    print(f"encdec: transcribed {len(files) - len(failures)} files, {audio_s:.1f} s of audio in "
          f"{decode_s:.1f} s (real-time factor {decode_s / max(audio_s, 1e-9):.4f}, "
          f"{torch.get_num_threads()} threads)", file=sys.stderr)
    if failures:
        raise AudioError(f"{len(failures)} of {len(files)} files could not be read (see above)")
