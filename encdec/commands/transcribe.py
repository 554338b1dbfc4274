"""`encdec transcribe RUN FILE|DIR ...`: audio files through a speech run, on
``encdec.transcribe.Transcriber``; the file listing and batched reading are shared with
`encdec pipeline`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from encdec.audio.io import AudioError
from encdec.decoding.audio import decode_audio
from encdec.transcribe import AUDIO_SUFFIXES, Transcriber


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


def run(run_dir: str, paths: list[str], *, checkpoint_name: str, output_path: str | None,
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
