"""Reading user corpora: parallel line files, TSV and JSONL, with errors that name file and line."""

from __future__ import annotations

import json
from pathlib import Path


class DataError(ValueError):
    """Bad input data; the message names the file and line and says what is wrong."""


def read_lines(path: str | Path) -> list[str]:
    """All lines of a UTF-8 text file (no trailing newline), rejecting NUL bytes and bad UTF-8."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # UTF-8 byte order mark
    chunks = raw.split(b"\n")
    if chunks and chunks[-1] == b"":
        chunks.pop()
    return [decode_line(chunk, path, lineno) for lineno, chunk in enumerate(chunks, 1)]


def decode_line(chunk: bytes, name: str | Path, lineno: int) -> str:
    """One line's bytes (without its newline) as text; DataError naming ``name:lineno`` for a
    NUL byte or invalid UTF-8."""
    nul = chunk.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{name}:{lineno}: NUL byte at byte {nul + 1} of the line; "
                        "is this a binary file?")
    try:
        line = chunk.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{name}:{lineno}: invalid UTF-8 at byte {err.start + 1} of the line "
                        f"({chunk[err.start:err.start + 4]!r}); re-encode the input as UTF-8") from None
    return line.rstrip("\r")


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> list[tuple[str, str]]:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise DataError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}: "
                        f"parallel files must have one line per pair (first unpaired line: "
                        f"{min(len(src), len(tgt)) + 1})")
    return list(zip(src, tgt))


def parse_tsv(line: str, path, lineno: int) -> tuple[str, str]:
    """One TSV line as a (source, target) pair; DataError naming ``path:lineno`` otherwise."""
    fields = line.split("\t")
    if len(fields) != 2:
        raise DataError(f"{path}:{lineno}: expected 2 tab-separated fields (source, target), "
                        f"found {len(fields)}")
    return fields[0], fields[1]


def parse_jsonl(line: str, path, lineno: int) -> tuple[str, str]:
    """One JSONL line as a (source, target) pair; a blank line is an empty pair (counted as
    empty, like an empty line elsewhere)."""
    if not line.strip():
        return "", ""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{lineno}: invalid JSON at column {err.colno}: {err.msg}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("src"), str) \
            or not isinstance(obj.get("tgt"), str):
        raise DataError(f'{path}:{lineno}: expected an object with string fields "src" and "tgt"')
    return obj["src"], obj["tgt"]


def read_tsv(path: str | Path) -> list[tuple[str, str]]:
    return [parse_tsv(line, path, n) for n, line in enumerate(read_lines(path), 1)]


def read_jsonl(path: str | Path) -> list[tuple[str, str]]:
    return [parse_jsonl(line, path, n) for n, line in enumerate(read_lines(path), 1)]


def pair_format(path: str | Path) -> str:
    """"tsv" or "jsonl" by the file's suffix; DataError for anything else."""
    suffix = Path(path).suffix.lower()
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    raise DataError(f"{path}: cannot tell the format; use a .tsv or .jsonl file, "
                    "or give source and target as two parallel files")


def read_pairs(path: str | Path, tgt_path: str | Path | None = None) -> list[tuple[str, str]]:
    """Pairs from a TSV/JSONL file, or from a source file plus a parallel target file."""
    if tgt_path is not None:
        return read_parallel(path, tgt_path)
    return read_tsv(path) if pair_format(path) == "tsv" else read_jsonl(path)
