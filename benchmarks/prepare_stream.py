"""Streaming `prepare` on a corpus larger than memory: pairs/s and peak RSS, then training start.

    python benchmarks/prepare_stream.py [--pairs 10000000] [--workers 2] [--work /tmp/encdec-big]
                                        [--train-steps 20]

1. Generates a synthetic parallel corpus of ``--pairs`` TSV lines (cached in ``--work``):
   sentences of 3-25 words drawn from Zipf-distributed vocabularies of 50,000 source and
   target words, paired at random, plus separate 2,000-pair dev and test files.
2. Runs ``encdec prepare --train ... --stream`` (SentencePiece BPE 8,000 per side trained on a
   1,000,000-pair sample) and reports wall time, pairs/s, and the peak resident memory of the
   whole process tree (the driver plus its workers, sampled every 0.2 s from /proc) and of the
   largest single process.
3. Trains a small Transformer on the result for ``--train-steps`` steps and reports the
   seconds to the first step (start-up: memory-mapping the arrays, building the epoch's
   batches) and the training process's peak RSS.

Not part of `make test`: 10 million pairs take several minutes and ~1.5 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ENCDEC = [sys.executable, "-m", "encdec.cli"]


def _vocabulary(n: int, rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnoprstuvwyz"
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(2, 10))))
    return sorted(words)


def _sentences(words: list[str], count: int, rng: np.random.Generator) -> list[str]:
    ranks = np.minimum(rng.zipf(1.2, size=count * 25), len(words)) - 1
    lengths = rng.integers(3, 26, size=count)
    out, pos = [], 0
    for n in lengths:
        out.append(" ".join(words[r] for r in ranks[pos:pos + n]))
        pos += n
    return out


def generate(path: Path, pairs: int, seed: int) -> None:
    """``pairs`` TSV lines from two pools of 1,000,000 sentences, paired at random."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    src_words, tgt_words = _vocabulary(50_000, rng), _vocabulary(50_000, rng)
    pool = min(pairs, 1_000_000)
    src, tgt = _sentences(src_words, pool, np_rng), _sentences(tgt_words, pool, np_rng)
    tmp = path.with_suffix(".part")
    with open(tmp, "w", encoding="utf-8") as f:
        for start in range(0, pairs, 100_000):
            n = min(100_000, pairs - start)
            a, b = np_rng.integers(0, pool, size=n), np_rng.integers(0, pool, size=n)
            f.write("".join(f"{src[i]}\t{tgt[j]}\n" for i, j in zip(a, b)))
    os.replace(tmp, path)


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def run_measured(cmd: list[str], log_path: Path, watch: Path | None = None) -> dict:
    """Run ``cmd``; wall seconds, peak RSS of its process tree and of its largest process, and
    the seconds until the file ``watch`` first had content."""
    start = time.perf_counter()
    first = None
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        peak_tree = peak_one = 0
        while proc.poll() is None:
            sizes = [_rss_kb(p) for p in _tree(proc.pid)]
            peak_tree, peak_one = max(peak_tree, sum(sizes)), max(peak_one, max(sizes))
            if first is None and watch is not None and watch.exists() and watch.stat().st_size:
                first = time.perf_counter() - start
            time.sleep(0.2)
    seconds = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log_path}")
    return {"seconds": seconds, "peak_tree_gb": peak_tree / 2 ** 20,
            "peak_process_gb": peak_one / 2 ** 20, "first": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=10_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/encdec-big"))
    ap.add_argument("--train-steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--train-only", action="store_true",
                    help="skip generating and preparing: train on the data prepared before")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    corpus = args.work / f"train-{args.pairs}.tsv"
    if not corpus.exists():
        t0 = time.perf_counter()
        generate(corpus, args.pairs, args.seed)
        generate(args.work / "dev.tsv", 2000, args.seed + 1)
        generate(args.work / "test.tsv", 2000, args.seed + 2)
        print(f"generated {args.pairs:,} pairs ({corpus.stat().st_size / 2 ** 30:.2f} GiB) in "
              f"{time.perf_counter() - t0:.0f} s")
    data = args.work / f"data-{args.pairs}"
    if args.train_only:
        if not (data / "meta.json").exists():
            sys.exit(f"--train-only: no prepared data at {data}; run without it first")
        train_on(args, data)
        return
    prep = run_measured([*ENCDEC, "prepare", "--train", str(corpus), "--dev",
                         str(args.work / "dev.tsv"), "--test", str(args.work / "test.tsv"),
                         "--out", str(data), "--force", "--stream", "--workers",
                         str(args.workers), "--vocab-size", "8000"], args.work / "prepare.log")
    meta = json.loads((data / "meta.json").read_text())
    kept = meta["splits"]["train"]["pairs"]
    disk = sum(p.stat().st_size for p in data.iterdir()) / 2 ** 30
    print(f"prepare --stream, {args.workers} workers: {args.pairs:,} pairs ({kept:,} kept) in "
          f"{prep['seconds']:.0f} s = {args.pairs / prep['seconds']:,.0f} pairs/s; peak RSS "
          f"{prep['peak_tree_gb']:.2f} GB all processes, {prep['peak_process_gb']:.2f} GB largest "
          f"process; data directory {disk:.2f} GiB")

    train_on(args, data)


def train_on(args, data: Path) -> None:
    run_dir = args.work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the run of an earlier benchmark
    train = run_measured([*ENCDEC, "train", str(ROOT / "configs/bible-en-es-small.yaml"),
                          f"data.dir={data}", f"train.run_dir={run_dir}",
                          f"train.max_steps={args.train_steps}", "train.log_every=1",
                          "train.valid_every=1000000", "train.valid_max_inputs=50",
                          "train.max_minutes=0", "train.max_epochs=0",
                          "model.d_model=128", "model.ffn_dim=256", "model.enc_layers=1",
                          "model.dec_layers=1", "model.share_embeddings=false"], args.work / "train.log",
                         watch=run_dir / "metrics.jsonl")
    print(f"train on it, {args.train_steps} steps (d_model 128, 1+1 layers): "
          f"{train['seconds']:.0f} s wall, first step logged {train['first'] or float('nan'):.1f} "
          f"s after launch, peak RSS {train['peak_process_gb']:.2f} GB")


if __name__ == "__main__":
    main()
