"""`encdec speak RUN "text" -o out.wav` or `-i lines.txt -o DIR/`, on ``encdec.speak.Speaker``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from encdec.speak import Speaker, SpeakError


def run(run_dir: str, *, text: str | None, input_path: str | None, output: str,
        length_scale: float, batch_size: int, checkpoint_name: str, device: str) -> None:
    """`encdec speak`: one text to one WAV file, or the lines of a file to DIR/NNNN.wav."""
    import soundfile
    from tqdm import tqdm

    if (text is None) == (input_path is None):
        raise SpeakError("give the text to speak, or -i FILE with one text per line")
    speaker = Speaker.from_run(run_dir, checkpoint_name, device)
    if text is not None:
        texts, paths, numbered = [text], [Path(output)], []
        if Path(output).suffix.lower() != ".wav":
            raise SpeakError(f"-o {output}: give a .wav file name for one text")
    else:
        try:
            lines = Path(input_path).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise SpeakError(f"{input_path}: cannot read it ({err})") from None
        numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
        texts = [line for _, line in numbered]
        if not texts:
            raise SpeakError(f"{input_path}: no lines to speak")
        width = max(4, len(str(len(texts))))
        paths = [Path(output) / f"{i + 1:0{width}d}.wav" for i in range(len(texts))]
        Path(output).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    seconds = 0.0
    with tqdm(total=len(texts), unit="text", disable=len(texts) == 1) as bar:
        for i in range(0, len(texts), batch_size):
            chunk = texts[i:i + batch_size]
            try:
                speeches = speaker.speak(chunk, length_scale=length_scale)
            except SpeakError as err:
                if err.index is None or not numbered:
                    raise
                raise SpeakError(f"{input_path}:{numbered[i + err.index][0]}: {err.reason}") \
                    from None
            for speech, path in zip(speeches, paths[i:i + batch_size]):
                path.parent.mkdir(parents=True, exist_ok=True)
                partial = path.with_name(f".{path.name}.tmp")
                soundfile.write(str(partial), speech.audio, speech.sample_rate, format="WAV")
                partial.replace(path)
                seconds += speech.seconds
            bar.update(len(chunk))
    elapsed = time.perf_counter() - start
    print(f"{len(texts)} file(s), {seconds:.1f} s of audio in {elapsed:.1f} s (real-time factor "
          f"{elapsed / max(seconds, 1e-9):.3f}, {torch.get_num_threads()} threads) -> {output}",
          file=sys.stderr)
