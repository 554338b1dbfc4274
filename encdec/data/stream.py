"""`encdec prepare --stream`: corpora larger than memory, prepared over every core.

The result is the same data directory as the in-memory `prepare` writes (byte for byte when
the tokenizer sample holds the whole training split), built so that no process ever holds the
corpus:

1. SentencePiece models (when used) are trained on a uniform sample of the cleaned training
   pairs: every chunk keys its pairs with seeded random numbers and the smallest
   ``tokenizer_sample`` keys win (bottom-k sampling, so the sample does not depend on how the
   corpus was chunked). The sample is put back in corpus order.
2. Workers clean, split (by a hash of the source when no dev/test files are given) and
   tokenize chunks of ``chunk_pairs`` lines in parallel. Each chunk writes its kept text and
   its token ids under chunk-local ids with the table of the tokens it saw, and sends back its
   statistics and training token counts only.
3. The vocabularies are built from the summed counts (as the in-memory path builds them), and
   every chunk's ids are mapped to vocabulary ids by one vectorized lookup and appended to the
   split's ``.tokens.npy`` and ``.offsets.npy`` with plain file writes. Training memory-maps
   the token arrays, so it starts without reading them whole.

Peak memory is a few chunks of raw lines plus the token counts, whatever the corpus size (the
multi-reference grouping of ``--group-refs`` holds the distinct sources of one split).
"""

from __future__ import annotations

import heapq
import json
import multiprocessing
import os
import shutil
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from itertools import chain
from pathlib import Path

import numpy as np

from encdec.data.corpus import DataError, decode_line, pair_format, parse_jsonl, parse_tsv
from encdec.data.prepare import (FORMAT_VERSION, check_replaceable, dropped_summary,
                                 refuse_empty_splits, write_data_dir, write_eval)
from encdec.data.recipes import hash_split
from encdec.data.tokenizers import SentencePieceTokenizer, _normalize, tokenizer_from_spec
from encdec.data.vocab import UNK, Vocab

SPLITS = ("train", "dev", "test")


# ---- reading ------------------------------------------------------------------------------
class Source:
    """One split's input: a TSV/JSONL file, or a source file and a parallel target file."""

    def __init__(self, paths: list[str | Path]):
        if not 1 <= len(paths) <= 2:
            raise DataError(f"expected a TSV/JSONL file or a source and a target file, got "
                            f"{len(paths)} files: {' '.join(map(str, paths))}")
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            if not p.is_file():
                raise DataError(f"{p}: no such file")
        self.format = "parallel" if len(self.paths) == 2 else pair_format(self.paths[0])

    def chunks(self, chunk_pairs: int):
        """(first line number, lines) per chunk; ``lines`` are raw bytes without the newline,
        one list per file."""
        files = [open(p, "rb") for p in self.paths]
        try:
            start, buf = 1, [[] for _ in files]
            lineno = 0
            while True:
                rows = [f.readline() for f in files]
                ended = [not r for r in rows]
                if any(ended):
                    if not all(ended):
                        self._unpaired(files, ended, lineno)
                    break
                lineno += 1
                for b, r in zip(buf, rows):
                    if lineno == 1 and r.startswith(b"\xef\xbb\xbf"):
                        r = r[3:]  # UTF-8 byte order mark
                    b.append(r[:-1] if r.endswith(b"\n") else r)
                if len(buf[0]) == chunk_pairs:
                    yield start, buf
                    start, buf = lineno + 1, [[] for _ in files]
            if buf[0]:
                yield start, buf
        finally:
            for f in files:
                f.close()

    def _unpaired(self, files, ended, lineno: int) -> None:
        rest = [lineno + (0 if done else 1 + sum(1 for _ in f)) for f, done in zip(files, ended)]
        raise DataError(f"{self.paths[0]} has {rest[0]} lines but {self.paths[1]} has {rest[1]}: "
                        f"parallel files must have one line per pair (first unpaired line: "
                        f"{lineno + 1})")


def _parse(fmt: str, names: list[str], start: int, lines: list[list[bytes]]):
    """(source, target) pairs of one chunk, as ``read_pairs`` reads them."""
    if fmt == "parallel":
        return [(decode_line(s, names[0], start + i), decode_line(t, names[1], start + i))
                for i, (s, t) in enumerate(zip(*lines))]
    parse = parse_tsv if fmt == "tsv" else parse_jsonl
    return [parse(decode_line(raw, names[0], start + i), names[0], start + i)
            for i, raw in enumerate(lines[0])]


def _clean(pairs, fixed_split: str | None):
    """Pairs per split, stripped, with empty ones counted and dropped (as `prepare` does)."""
    out = {}
    for s, t in pairs:
        split = fixed_split or hash_split(s)
        entry = out.setdefault(split, {"pairs": [], "input_pairs": 0, "dropped_empty": 0})
        entry["input_pairs"] += 1
        s, t = s.strip(), t.strip()
        if s and t:
            entry["pairs"].append((s, t))
        else:
            entry["dropped_empty"] += 1
    return out


# ---- work done in the worker processes ----------------------------------------------------
_TOKENIZERS: dict = {}


def _tokenizer(spec: dict, directory: str):
    key = (json.dumps(spec, sort_keys=True), directory)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = tokenizer_from_spec(spec, directory)
    return _TOKENIZERS[key]


def _keys(seed: int, positions: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per position, a function of (seed, position) alone
    (SplitMix64), so the sample does not depend on how the corpus is chunked."""
    with np.errstate(over="ignore"):
        x = positions.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(2 ** 53)


def _sample_chunk(job: dict):
    """Up to ``k`` (key, line, source, target) of this chunk's cleaned training pairs with the
    smallest keys, and how many training pairs the chunk has."""
    pairs = _parse(job["format"], job["names"], job["start"], job["lines"])
    train, lines = [], []
    for lineno, (s, t) in enumerate(pairs, job["start"]):
        if job["split"] is None and hash_split(s) != "train":
            continue
        s, t = s.strip(), t.strip()
        if s and t:
            train.append((s, t))
            lines.append(lineno)
    keys = _keys(job["seed"], np.asarray(lines, dtype=np.int64))
    take = np.argsort(keys, kind="stable")[: job["k"]]
    return [(float(keys[i]), lines[i], *train[i]) for i in take], len(train)


def _encode_side(tok, texts: list[str]):
    """Token ids of ``texts`` under a chunk-local table: (flat int32 ids, lengths, table)."""
    if isinstance(tok, SentencePieceTokenizer):
        # SentencePiece's own ids; its piece list is the table. A character SentencePiece never
        # saw comes back as its unknown piece, which the vocabulary maps to <unk> as it would
        # the character itself (the vocabulary holds only training tokens, all known).
        ids = tok.sp.encode([_normalize(t, tok.lowercase) for t in texts], out_type=int)
        table = [tok.sp.id_to_piece(i) for i in range(tok.sp.get_piece_size())]
        table[tok.sp.unk_id()] = "<unk>"
    else:
        index: dict[str, int] = {}
        table = []
        ids = []
        for text in texts:
            row = []
            for token in tok.encode(text):
                i = index.get(token)
                if i is None:
                    i = index[token] = len(table)
                    table.append(token)
                row.append(i)
            ids.append(row)
    lengths = np.fromiter((len(r) for r in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths, table


def _encode_chunk(job: dict):
    """Clean, split and tokenize one chunk; write its parts under ``job["dir"]``; return its
    statistics and training token counts."""
    pairs = _parse(job["format"], job["names"], job["start"], job["lines"])
    toks = {side: _tokenizer(job[f"{side}_spec"], job["tok_dir"]) for side in ("src", "tgt")}
    max_len, out_dir, k = job["max_len"], Path(job["dir"]), job["index"]
    result = {}
    for split, entry in _clean(pairs, job["split"]).items():
        kept = entry["pairs"]
        enc = {side: _encode_side(toks[side], [p[col] for p in kept])
               for col, side in enumerate(("src", "tgt"))}
        s_len, t_len = enc["src"][1], enc["tgt"][1]
        empty = (s_len == 0) | (t_len == 0)
        too_long = ~empty & ((s_len > max_len) | (t_len > max_len))
        keep = ~(empty | too_long)
        stats = {"input_pairs": entry["input_pairs"],
                 "dropped_empty": entry["dropped_empty"] + int(empty.sum()),
                 "dropped_too_long": int(too_long.sum()), "pairs": int(keep.sum())}
        counts = {}
        stem = out_dir / f"{split}.{k:06d}"
        for side in ("src", "tgt"):
            flat, lengths, table = enc[side]
            starts = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=starts[1:])
            row_of_token = np.repeat(np.arange(len(lengths)), lengths)
            flat, lengths = flat[keep[row_of_token]], lengths[keep]
            np.save(f"{stem}.{side}.ids.npy", flat)
            np.save(f"{stem}.{side}.lengths.npy", lengths)
            with open(f"{stem}.{side}.table.json", "w", encoding="utf-8") as f:
                json.dump(table, f, ensure_ascii=False)
            stats[f"{side}_tokens"] = int(lengths.sum())
            if split == "train":
                freq = np.bincount(flat, minlength=len(table))
                counts[side] = {table[i]: int(freq[i]) for i in np.flatnonzero(freq)}
        with open(f"{stem}.src.txt", "w", encoding="utf-8") as fs, \
                open(f"{stem}.tgt.txt", "w", encoding="utf-8") as ft:
            for (s, t), ok in zip(kept, keep):
                if ok:
                    fs.write(s + "\n")
                    ft.write(t + "\n")
        result[split] = (stats, counts)
    return result


# ---- the driver ---------------------------------------------------------------------------
def _ordered(fn, jobs, workers: int):
    """``fn`` over ``jobs`` in order, on ``workers`` processes with at most two jobs each in
    flight (so reading never runs ahead of the workers and memory stays bounded)."""
    if workers <= 1:
        for job in jobs:
            yield fn(job)
        return
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        pending: deque = deque()
        for job in jobs:
            pending.append(pool.submit(fn, job))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _jobs(sources: dict[str, Source], chunk_pairs: int, split_by_hash: bool, extra: dict):
    index = 0
    for split, source in sources.items():
        for start, lines in source.chunks(chunk_pairs):
            yield {"format": source.format, "names": [str(p) for p in source.paths],
                   "start": start, "lines": lines, "split": None if split_by_hash else split,
                   "index": index, **extra}
            index += 1


def _sample(sources, chunk_pairs, split_by_hash, k: int, seed: int, workers: int, log):
    """A uniform sample of at most ``k`` cleaned training pairs, in corpus order."""
    heap: list = []  # the k smallest keys, as a max-heap of (-key, position, pair)
    total = 0
    train_only = {s: src for s, src in sources.items() if s == "train"}
    for rows, n in _ordered(_sample_chunk, _jobs(train_only, chunk_pairs, split_by_hash,
                                                 {"k": k, "seed": seed}), workers):
        total += n
        for key, pos, s, t in rows:
            if len(heap) < k:
                heapq.heappush(heap, (-key, pos, s, t))
            elif -key > heap[0][0]:
                heapq.heapreplace(heap, (-key, pos, s, t))
    sample = sorted((pos, s, t) for _, pos, s, t in heap)
    log(f"tokenizer sample: {len(sample)} of {total} training pairs")
    return [(s, t) for _, s, t in sample]


def _train_tokenizers(sample, src_spec, tgt_spec, tmp: Path, vocab_size, spm_type, joint_vocab):
    if joint_vocab and src_spec.get("kind") == "sentencepiece":
        tok = SentencePieceTokenizer.train([s for s, _ in sample] + [t for _, t in sample],
                                           tmp / "spm.joint", vocab_size, spm_type,
                                           src_spec.get("lowercase", False))
        return {"src": tok.spec(), "tgt": tok.spec()}
    specs = {}
    for col, (side, spec) in enumerate((("src", src_spec), ("tgt", tgt_spec))):
        if spec.get("kind") == "sentencepiece":
            specs[side] = SentencePieceTokenizer.train(
                [p[col] for p in sample], tmp / f"spm.{side}", vocab_size, spm_type,
                spec.get("lowercase", False)).spec()
        else:
            specs[side] = tokenizer_from_spec(spec, tmp).spec()
    return specs


def _write_npy_header(f, dtype, n: int) -> None:
    fmt = np.lib.format
    fmt.write_array_header_1_0(f, {"descr": fmt.dtype_to_descr(np.dtype(dtype)),
                                   "fortran_order": False, "shape": (n,)})


def _assemble(tmp: Path, parts: Path, split: str, chunks: list[int], vocabs: dict, totals: dict):
    """Join one split's chunk parts into its text files and binarized arrays; returns the
    number of source <unk> tokens."""
    unk = 0
    with open(tmp / f"{split}.src.txt", "wb") as fs, open(tmp / f"{split}.tgt.txt", "wb") as ft:
        for k in chunks:
            for side, f in (("src", fs), ("tgt", ft)):
                with open(parts / f"{split}.{k:06d}.{side}.txt", "rb") as part:
                    shutil.copyfileobj(part, f)
    for side in ("src", "tgt"):
        stoi = vocabs[side].stoi
        with open(tmp / f"{split}.{side}.tokens.npy", "wb") as ftok, \
                open(tmp / f"{split}.{side}.offsets.npy", "wb") as foff:
            _write_npy_header(ftok, np.int32, totals[f"{side}_tokens"])
            _write_npy_header(foff, np.int64, totals["pairs"] + 1)
            foff.write(np.zeros(1, dtype=np.int64).tobytes())
            base = 0
            for k in chunks:
                stem = parts / f"{split}.{k:06d}.{side}"
                table = json.loads(Path(f"{stem}.table.json").read_text(encoding="utf-8"))
                mapping = np.fromiter((stoi.get(t, UNK) for t in table), dtype=np.int32,
                                      count=len(table))
                ids = mapping[np.load(f"{stem}.ids.npy")]
                lengths = np.load(f"{stem}.lengths.npy")
                ftok.write(ids.tobytes())
                foff.write((base + np.cumsum(lengths)).tobytes())
                base += int(lengths.sum())
                if side == "src":
                    unk += int((ids == UNK).sum())
    return unk


def _pairs_of(tmp: Path, split: str):
    with open(tmp / f"{split}.src.txt", encoding="utf-8") as fs, \
            open(tmp / f"{split}.tgt.txt", encoding="utf-8") as ft:
        for s, t in zip(fs, ft):
            yield s[:-1], t[:-1]


def prepare_stream(train: list[str | Path], out_dir: str | Path, *, dev=None, test=None,
                   src_tokenizer: dict, tgt_tokenizer: dict, metric: str = "text",
                   group_refs: bool = False, max_len: int = 256, vocab_size: int = 8000,
                   spm_type: str = "bpe", joint_vocab: bool = False, min_freq: int = 1,
                   tokenizer_sample: int = 1_000_000, chunk_pairs: int = 100_000,
                   workers: int | None = None, seed: int = 1, force: bool = False,
                   log=print) -> dict:
    """Prepare a user corpus from files without holding it in memory; returns its meta dict.

    ``train``, ``dev`` and ``test`` are each a TSV/JSONL file or a source and a target file;
    without ``dev`` and ``test``, 5 % + 5 % of the pairs are split off by a hash of the source.
    """
    if bool(dev) != bool(test):
        raise DataError("give both --dev and --test, or neither (then 5%/5% are split off "
                        "the training data by a hash of the source)")
    if tokenizer_sample < 1 or chunk_pairs < 1:
        raise DataError("--tokenizer-sample and --chunk-pairs must be positive")
    workers = workers or min(os.cpu_count() or 1, 8)
    out = Path(out_dir)
    check_replaceable(out, force)
    split_by_hash = not dev
    sources = {"train": Source(train)}
    if dev:
        sources.update(dev=Source(dev), test=Source(test))
    return write_data_dir(out, lambda tmp: _build(
        sources, tmp, split_by_hash=split_by_hash, src_spec=src_tokenizer, tgt_spec=tgt_tokenizer,
        metric=metric, group_refs=group_refs, max_len=max_len, vocab_size=vocab_size,
        spm_type=spm_type, joint_vocab=joint_vocab, min_freq=min_freq,
        tokenizer_sample=tokenizer_sample, chunk_pairs=chunk_pairs, workers=workers, seed=seed,
        log=log), log)


def _build(sources, tmp: Path, *, split_by_hash, src_spec, tgt_spec, metric, group_refs,
           max_len, vocab_size, spm_type, joint_vocab, min_freq, tokenizer_sample, chunk_pairs,
           workers, seed, log):
    # 1. Tokenizers: SentencePiece on a sample of the training pairs.
    if "sentencepiece" in (src_spec.get("kind"), tgt_spec.get("kind")):
        sample = _sample(sources, chunk_pairs, split_by_hash, tokenizer_sample, seed, workers,
                         log)
        if not sample:
            raise DataError("no training pairs left: every training pair is empty")
    else:
        sample = []
    specs = _train_tokenizers(sample, src_spec, tgt_spec, tmp, vocab_size, spm_type, joint_vocab)
    del sample

    # 2. Clean, split and tokenize the chunks in parallel.
    parts = tmp / "parts"
    parts.mkdir()
    stats = {s: {"input_pairs": 0, "dropped_empty": 0, "dropped_too_long": 0, "pairs": 0,
                 "src_tokens": 0, "tgt_tokens": 0} for s in (SPLITS if split_by_hash else sources)}
    chunks: dict[str, list[int]] = {s: [] for s in stats}
    counts = {"src": Counter(), "tgt": Counter()}
    extra = {"src_spec": specs["src"], "tgt_spec": specs["tgt"], "tok_dir": str(tmp),
             "max_len": max_len, "dir": str(parts)}
    n_chunks = 0
    for k, result in enumerate(_ordered(_encode_chunk, _jobs(sources, chunk_pairs, split_by_hash,
                                                             extra), workers)):
        n_chunks += 1
        for split, (st, chunk_counts) in result.items():
            for key, value in st.items():
                stats[split][key] += value
            chunks[split].append(k)
            for side, c in chunk_counts.items():
                counts[side].update(c)
        if n_chunks % 10 == 0:
            log(f"  {n_chunks} chunks ({n_chunks * chunk_pairs:,} lines) tokenized")
    refuse_empty_splits({s: st["pairs"] for s, st in stats.items()}, stats, max_len, split_by_hash)

    # 3. Vocabularies from the training counts; chunk parts joined into the split files.
    if joint_vocab:
        vocab = Vocab.build(counts["src"] + counts["tgt"], min_freq=min_freq)
        vocabs = {"src": vocab, "tgt": vocab}
    else:
        vocabs = {side: Vocab.build(counts[side], min_freq=min_freq) for side in ("src", "tgt")}
    del counts
    vocabs["src"].save(tmp / "src.vocab")
    vocabs["tgt"].save(tmp / "tgt.vocab")
    for split, st in stats.items():
        unk = _assemble(tmp, parts, split, chunks[split], vocabs, st)
        n_eval = write_eval(tmp / f"{split}.eval.jsonl", _pairs_of(tmp, split), group_refs)
        stats[split] = {"input_pairs": st["input_pairs"], "dropped_empty": st["dropped_empty"],
                        "dropped_too_long": st["dropped_too_long"], "pairs": st["pairs"],
                        "eval_inputs": n_eval, "src_tokens": st["src_tokens"],
                        "tgt_tokens": st["tgt_tokens"], "src_unk": unk}
    shutil.rmtree(parts)

    meta = {
        "format": FORMAT_VERSION, "name": "custom", "metric": metric,
        "src_tokenizer": specs["src"], "tgt_tokenizer": specs["tgt"],
        "joint_vocab": joint_vocab, "src_vocab_size": len(vocabs["src"]),
        "tgt_vocab_size": len(vocabs["tgt"]), "max_len": max_len, "splits": stats,
        "skipped": {},
        "options": {"max_len": max_len, "vocab_size": vocab_size, "spm_type": spm_type,
                    "joint_vocab": joint_vocab},
        "stream": {"chunks": n_chunks, "chunk_pairs": chunk_pairs, "workers": workers,
                   "tokenizer_sample": tokenizer_sample, "seed": seed},
    }
    return meta, [dropped_summary(split, st, max_len) for split, st in stats.items()]
