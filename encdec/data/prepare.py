"""`encdec prepare`: clean, split, tokenize, build vocabularies and binarize a corpus, once.

Data directory layout::

    meta.json                 tokenizers, vocab sizes, metric, per-split statistics
    src.vocab  tgt.vocab      one token per line, specials first
    spm.*.model               SentencePiece models (when used)
    {split}.src.txt / .tgt.txt  cleaned text pairs
    {split}.eval.jsonl        {"src": ..., "refs": [...]} per evaluation input
    {split}.{src,tgt}.tokens.npy / .offsets.npy   binarized ids, memory-mapped at training time
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from encdec.data.corpus import DataError
from encdec.data.recipes import Corpus, hash_split
from encdec.data.tokenizers import SentencePieceTokenizer, tokenizer_from_spec
from encdec.data.vocab import Vocab

FORMAT_VERSION = 1


def split_by_hash(pairs: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    splits: dict[str, list[tuple[str, str]]] = {"train": [], "dev": [], "test": []}
    for pair in pairs:
        splits[hash_split(pair[0])].append(pair)
    return splits


def is_data_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``encdec prepare`` (or ``encdec distill``)."""
    meta = Path(path) / "meta.json"
    try:
        return "format" in json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def check_replaceable(out: str | Path, force: bool = False) -> None:
    """Refuse to replace ``out`` unless it is missing, empty, an encdec data directory, or
    ``force`` is given: a mistyped ``--out`` must not delete a user's directory."""
    out = Path(out)
    if not out.exists() or force:
        return
    if not out.is_dir():
        raise DataError(f"--out {out} is a file, not a data directory; choose another path")
    if any(out.iterdir()) and not is_data_dir(out):
        raise DataError(f"--out {out} exists and is not an encdec data directory (no meta.json "
                        "from `encdec prepare`); it would be replaced. Choose another path, or "
                        "pass --force to replace it")


def new_tmp_dir(out: Path) -> Path:
    """A fresh directory beside ``out`` to build it in; its name never collides with a user's."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)  # mkdtemp makes it private (0700); the data directory is not
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


def swap_into_place(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished ``tmp``, so a crash never leaves half a directory."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def prepare(corpus: Corpus, out_dir: str | Path, *, max_len: int = 256, vocab_size: int = 8000,
            spm_type: str = "bpe", joint_vocab: bool = False, min_freq: int = 1,
            name: str = "custom", options: dict | None = None, force: bool = False,
            log=print) -> dict:
    """Write a prepared data directory for ``corpus``; returns its meta dict.

    Refuses (DataError) a corpus left with no training, dev or test pairs after cleaning, and an
    ``out_dir`` that is not a data directory (unless ``force``). Nothing is left behind on error.
    """
    out = Path(out_dir)
    check_replaceable(out, force)
    if "train" not in corpus.splits or not corpus.splits["train"]:
        raise DataError("the corpus has no training pairs")

    def build(tmp: Path) -> tuple[dict, list[str]]:
        meta, summary = _build(corpus, tmp, max_len=max_len, vocab_size=vocab_size,
                               spm_type=spm_type, joint_vocab=joint_vocab, min_freq=min_freq,
                               name=name)
        meta["options"] = options if options is not None else {
            "max_len": max_len, "vocab_size": vocab_size, "spm_type": spm_type,
            "joint_vocab": joint_vocab}
        return meta, summary

    return write_data_dir(out, build, log)


def write_data_dir(out: Path, build, log=print) -> dict:
    """Build a data directory beside ``out`` with ``build(tmp) -> (meta, summary lines)``,
    write its meta.json and swap it into place; nothing is left behind on error. Logs the
    summary and returns the meta dict."""
    tmp = new_tmp_dir(out)
    try:
        meta, summary = build(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for line in summary:
        log(line)
    log(f"vocab: {meta['src_vocab_size']} src / {meta['tgt_vocab_size']} tgt -> {out}")
    return meta


def _dropped(st: dict, max_len: int) -> str:
    return (f"{st['input_pairs']} read, {st['dropped_empty']} dropped as empty, "
            f"{st['dropped_too_long']} dropped as over {max_len} tokens (--max-len)")


def refuse_empty_splits(kept: dict[str, int], stats: dict, max_len: int,
                        split_by_hash: bool) -> None:
    """DataError when cleaning left train, dev or test without pairs, saying why."""
    for split in ("train", "dev", "test"):
        if split in kept and not kept[split]:
            hint = {"train": "nothing to train on",
                    "dev": "validation would score nothing (and call it perfect)",
                    "test": "evaluation would score nothing"}[split]
            if split != "train" and split_by_hash:
                hint += (f"; the {split} split is 5% of the pairs by a hash of the source, too "
                         "few for this corpus: give --dev and --test files")
            raise DataError(f"no {split} pairs left: {_dropped(stats[split], max_len)}; {hint}")


def _build(corpus: Corpus, tmp: Path, *, max_len: int, vocab_size: int, spm_type: str,
           joint_vocab: bool, min_freq: int, name: str) -> tuple[dict, list[str]]:
    # 1. Clean: strip whitespace, drop empty pairs (counted).
    stats: dict[str, dict] = {}
    cleaned: dict[str, list[tuple[str, str]]] = {}
    for split, pairs in corpus.splits.items():
        keep = [(s.strip(), t.strip()) for s, t in pairs]
        nonempty = [(s, t) for s, t in keep if s and t]
        cleaned[split] = nonempty
        stats[split] = {"input_pairs": len(pairs), "dropped_empty": len(pairs) - len(nonempty)}

    # 2. Tokenizers (SentencePiece is trained on the training split only).
    tokenizers = {}
    train = cleaned["train"]
    if joint_vocab and corpus.src_tokenizer.get("kind") == "sentencepiece":
        tok = SentencePieceTokenizer.train([s for s, _ in train] + [t for _, t in train],
                                           tmp / "spm.joint", vocab_size, spm_type,
                                           corpus.src_tokenizer.get("lowercase", False))
        tokenizers = {"src": tok, "tgt": tok}
    else:
        for side, spec in (("src", corpus.src_tokenizer), ("tgt", corpus.tgt_tokenizer)):
            if spec.get("kind") == "sentencepiece":
                col = 0 if side == "src" else 1
                tokenizers[side] = SentencePieceTokenizer.train(
                    [p[col] for p in train], tmp / f"spm.{side}", vocab_size, spm_type,
                    spec.get("lowercase", False))
            else:
                tokenizers[side] = tokenizer_from_spec(spec, tmp)

    # 3. Tokenize; drop over-long pairs (counted).
    tokenized: dict[str, list[tuple[list[str], list[str], int]]] = {}
    for split, pairs in cleaned.items():
        rows = []
        for i, (s, t) in enumerate(pairs):
            s_tok, t_tok = tokenizers["src"].encode(s), tokenizers["tgt"].encode(t)
            if not s_tok or not t_tok:
                stats[split]["dropped_empty"] += 1
            elif len(s_tok) > max_len or len(t_tok) > max_len:
                stats[split]["dropped_too_long"] = stats[split].get("dropped_too_long", 0) + 1
            else:
                rows.append((s_tok, t_tok, i))
        stats[split].setdefault("dropped_too_long", 0)
        tokenized[split] = rows
    refuse_empty_splits({k: len(v) for k, v in tokenized.items()}, stats, max_len,
                        corpus.split_by_hash)

    # 4. Vocabularies from the training split.
    src_counts = Counter(tok for s, _, _ in tokenized["train"] for tok in s)
    tgt_counts = Counter(tok for _, t, _ in tokenized["train"] for tok in t)
    if joint_vocab:
        vocab = Vocab.build(src_counts + tgt_counts, min_freq=min_freq)
        vocabs = {"src": vocab, "tgt": vocab}
    else:
        vocabs = {"src": Vocab.build(src_counts, min_freq=min_freq),
                  "tgt": Vocab.build(tgt_counts, min_freq=min_freq)}
    vocabs["src"].save(tmp / "src.vocab")
    vocabs["tgt"].save(tmp / "tgt.vocab")

    # 5. Text, evaluation references and binarized arrays per split.
    for split, rows in tokenized.items():
        pairs = [cleaned[split][i] for _, _, i in rows]
        (tmp / f"{split}.src.txt").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
        (tmp / f"{split}.tgt.txt").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")
        n_eval = write_eval(tmp / f"{split}.eval.jsonl", pairs, corpus.group_refs)
        for side, col in (("src", 0), ("tgt", 1)):
            ids = [vocabs[side].encode(r[col]) for r in rows]
            _write_binarized(tmp, split, side, ids)
        src_unk = sum(vocabs["src"].encode(r[0]).count(3) for r in rows)
        stats[split].update({
            "pairs": len(rows), "eval_inputs": n_eval,
            "src_tokens": int(sum(len(r[0]) for r in rows)),
            "tgt_tokens": int(sum(len(r[1]) for r in rows)),
            "src_unk": int(src_unk),
        })

    meta = {
        "format": FORMAT_VERSION, "name": name, "metric": corpus.metric,
        "src_tokenizer": tokenizers["src"].spec(), "tgt_tokenizer": tokenizers["tgt"].spec(),
        "joint_vocab": joint_vocab, "src_vocab_size": len(vocabs["src"]),
        "tgt_vocab_size": len(vocabs["tgt"]), "max_len": max_len, "splits": stats,
        "skipped": corpus.skipped,
    }
    summary = [dropped_summary(split, st, max_len) for split, st in stats.items()]
    return meta, summary


def write_eval(path: Path, pairs, group_refs: bool) -> int:
    """``{split}.eval.jsonl``: one line per evaluation input with its references, in corpus
    order; with ``group_refs`` every target of the same source is a reference of one input.
    Returns the number of inputs."""
    with open(path, "w", encoding="utf-8") as f:
        if not group_refs:
            n = 0
            for s, t in pairs:
                f.write(json.dumps({"src": s, "refs": [t]}, ensure_ascii=False) + "\n")
                n += 1
            return n
        refs: dict[str, list[str]] = {}
        for s, t in pairs:
            refs.setdefault(s, []).append(t)
        for s, ref_list in refs.items():  # dicts keep first-seen order
            f.write(json.dumps({"src": s, "refs": ref_list}, ensure_ascii=False) + "\n")
        return len(refs)


def dropped_summary(split: str, st: dict, max_len: int) -> str:
    return (f"{split:>6}: {st['pairs']:>7} pairs ({st['eval_inputs']} eval inputs), "
            f"{st['src_tokens']} src / {st['tgt_tokens']} tgt tokens; dropped "
            f"{st['dropped_empty']} empty, {st['dropped_too_long']} over {max_len} tokens")


def _write_binarized(directory: Path, split: str, side: str, ids: list[list[int]]) -> None:
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1]))
    np.save(directory / f"{split}.{side}.tokens.npy", flat)
    np.save(directory / f"{split}.{side}.offsets.npy", offsets)


def load_meta(data_dir: str | Path) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.exists():
        raise DataError(f"{data_dir}: not a prepared data directory (no meta.json); "
                        "run `encdec prepare` first")
    return json.loads(path.read_text(encoding="utf-8"))
