"""`encdec pipeline ASR_RUN MT_RUN AUDIO...`: audio files through a cascade of runs, on
``encdec.pipeline.Pipeline``."""

from __future__ import annotations

import contextlib
import sys
import time

import torch

from encdec.audio.io import AudioError
from encdec.commands.transcribe import audio_batches, expand_inputs
from encdec.pipeline import Pipeline


def run(run_dirs: list[str], paths: list[str], *, checkpoint_name: str,
        output_path: str | None, device: str, stage_overrides: list[dict],
        asr_nbest: int = 1, rescore: bool = False, show_transcript: bool = False,
        progress: bool = True, batch_files: int = 64) -> None:
    """Print ``FILE<TAB>output`` (``<TAB>transcript`` with ``show_transcript``) per audio file;
    the real-time factor of the whole pipeline at the end. Like ``encdec transcribe``, a file
    that cannot be read is reported (stderr) and skipped, and the exit status then says so."""
    from tqdm import tqdm

    pipeline = Pipeline.from_runs(run_dirs, checkpoint_name, device)
    pipeline.stage_settings(1, asr_nbest, stage_overrides)  # bad settings fail before any audio
    tr = pipeline.transcriber
    files = expand_inputs(paths)
    audio_s = decode_s = 0.0
    failures: list = []
    with open(output_path, "w", encoding="utf-8") if output_path else \
            contextlib.nullcontext(sys.stdout) as out, \
            tqdm(total=len(files), unit="file", file=sys.stderr, disable=not progress) as bar:
        for chunk, waves in audio_batches(tr, files, batch_files, bar, failures):
            began = time.perf_counter()
            results = pipeline.run_nbest(
                [(w, tr.sample_rate) for w in waves], rescore=rescore, asr_nbest=asr_nbest,
                stage_overrides=stage_overrides, warn=lambda i, m, chunk=chunk: tqdm.write(
                    f"encdec: warning: {chunk[i]}: {m}", file=sys.stderr))
            decode_s += time.perf_counter() - began
            audio_s += sum(w.numel() for w in waves) / tr.sample_rate
            for f, nbest in zip(chunk, results):
                best = nbest[0]
                extra = f"\t{best.transcript}" if show_transcript else ""
                out.write(f"{f}\t{best.text}{extra}\n")
            out.flush()
            bar.update(len(chunk))
    print(f"encdec: ran {len(files) - len(failures)} files through {len(run_dirs)} stages, "
          f"{audio_s:.1f} s of audio in {decode_s:.1f} s (real-time factor "
          f"{decode_s / max(audio_s, 1e-9):.4f}, {torch.get_num_threads()} threads)",
          file=sys.stderr)
    if failures:
        raise AudioError(f"{len(failures)} of {len(files)} files could not be read (see above)")
