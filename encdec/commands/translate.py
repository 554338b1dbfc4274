"""`encdec translate RUN`: a file (-i), a pipe or an interactive prompt through a text run,
on ``encdec.translate.Translator``."""

from __future__ import annotations

import queue
import sys
import threading
import time
from pathlib import Path

from encdec.data.corpus import decode_line
from encdec.files import atomic_write_text
from encdec.translate import Translator


def stdin_blocks(stream, max_lines: int, wait: float = 0.05, name: str = "<stdin>"):
    """Lines of the binary ``stream`` in blocks: as many as are ready (up to ``max_lines``)
    without waiting more than ``wait`` seconds for the next, so piped files are batched and a
    line typed or written by another program is answered at once. A line that is not UTF-8
    ends the stream with DataError naming it, after the lines before it were yielded."""
    lines: queue.Queue = queue.Queue(maxsize=4 * max_lines)

    def reader():
        try:
            for lineno, raw in enumerate(stream, 1):
                lines.put(decode_line(raw.rstrip(b"\n"), name, lineno))
        except BaseException as err:  # noqa: BLE001 - handed to the consuming thread
            lines.put(err)
        finally:
            lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    failure = None
    while failure is None:
        first = lines.get()
        if first is None:
            return
        if isinstance(first, BaseException):
            raise first
        block = [first]
        done = False
        while len(block) < max_lines:
            try:
                line = lines.get(timeout=wait)
            except queue.Empty:
                break
            if line is None:
                done = True
                break
            if isinstance(line, BaseException):
                failure = line
                break
            block.append(line)
        yield block
        if done:
            return
    raise failure


def run(run_dir: str, *, checkpoint_name: str, input_path: str | None, output_path: str | None,
        scores: bool, device: str, overrides: dict, long_inputs: str = "split",
        progress: bool | None = None, rerank: str | None = None, engine: str = "encdec",
        export_dir: str | None = None) -> None:
    tr = Translator.from_run(run_dir, checkpoint_name, device, engine=engine,
                             export_dir=export_dir)
    cfg = tr.decode_config(**overrides)  # bad settings fail before any input is read
    reranker = Translator.from_run(rerank, device=device) if rerank else None
    if reranker is not None:
        tr.translate_nbest([], rerank=reranker, **overrides)  # fails now if it cannot rerank
    n = overrides.get("nbest") or 1
    offset = 0  # line number of the first line of the current block, minus one

    def fmt(results):
        lines = []
        for nb in results:
            for rank, t in enumerate(nb[:n]):
                prefix = f"{rank}\t" if n > 1 else ""
                lines.append(f"{prefix}{t.text}\t{t.score:.4f}" if scores else f"{prefix}{t.text}")
        return lines

    def warn(index, message):
        name = input_path or "<stdin>"
        print(f"encdec: warning: {name}:{offset + index + 1}: {message}", file=sys.stderr)

    def translate(lines, bar=None):
        return tr.translate_nbest(lines, progress=bar.update if bar else None, warn=warn,
                                  long_inputs=long_inputs, rerank=reranker, **overrides)

    if input_path is not None:
        from tqdm import tqdm

        from encdec.data.corpus import read_lines

        lines = read_lines(input_path)
        show = progress if progress is not None else True
        start = time.perf_counter()
        with tqdm(total=len(lines), unit="line", file=sys.stderr, disable=not show) as bar:
            results = translate(lines, bar)
        seconds = time.perf_counter() - start
        text = "".join(line + "\n" for line in fmt(results))
        if output_path:
            atomic_write_text(Path(output_path), text)
        else:
            sys.stdout.write(text)
            sys.stdout.flush()
        print(f"encdec: translated {len(lines)} lines in {seconds:.1f} s "
              f"({len(lines) / max(seconds, 1e-9):.1f} lines/s)", file=sys.stderr)
        return
    if sys.stdin.isatty():  # interactive prompt
        print("encdec: type an input and press Enter (Ctrl-D to quit)", file=sys.stderr)
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return
            except UnicodeDecodeError:
                print("encdec: that line is not valid UTF-8; type it again", file=sys.stderr)
                continue
            for out in fmt(translate([line])):
                print(out, flush=True)
            offset += 1
    out = open(output_path, "w", encoding="utf-8") if output_path else sys.stdout
    try:
        # Blocks of whatever stdin has ready, each sorted and batched inside decode_texts;
        # output in input order, flushed per block, so encdec can sit in a pipe.
        for block in stdin_blocks(sys.stdin.buffer, max_lines=4 * cfg.batch_size):
            for text in fmt(translate(block)):
                out.write(text + "\n")
            out.flush()
            offset += len(block)
    finally:
        if output_path:
            out.close()
