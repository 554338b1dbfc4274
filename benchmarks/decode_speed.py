"""Decoding speed on a whole test split, batch 64: encdec greedy and beam 5 vs a plain
torch.nn.Transformer greedy loop carrying the same weights (tutorial style, no cache).

    python benchmarks/decode_speed.py RUN [--split test] [--repeats 3]

Inputs/s include tokenization and detokenization for encdec. The reference decodes the same
length-sorted batches; its outputs are checked against encdec's greedy outputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import ReferenceTransformer  # noqa: E402

from encdec.data.dataset import read_eval  # noqa: E402
from encdec.data.vocab import PAD  # noqa: E402
from encdec.decoding.greedy import max_lengths  # noqa: E402
from encdec.translate import Translator  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--split", default="test")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tr = Translator.from_run(args.run)
    words = [e["src"] for e in read_eval(tr.cfg.data.dir, args.split)]
    if args.limit:
        words = words[: args.limit]
    ref = ReferenceTransformer(tr.cfg.model, tr.assets.meta["src_vocab_size"],
                               tr.assets.meta["tgt_vocab_size"]).load_encdec(tr.model).eval()
    a, b = tr.cfg.decode.max_len_a, tr.cfg.decode.max_len_b

    def ref_run():
        ids = [tr.assets.src_vocab.encode(tr.assets.src_tokenizer.encode(w)) for w in words]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        outs = [None] * len(ids)
        for s in range(0, len(order), args.batch):
            chunk = order[s:s + args.batch]
            src = torch.full((len(chunk), max(len(ids[i]) for i in chunk)), PAD, dtype=torch.long)
            for r, i in enumerate(chunk):
                src[r, : len(ids[i])] = torch.tensor(ids[i])
            steps = int(max_lengths(src.ne(PAD), a, b).max())
            ys = ref.greedy(src, steps)
            for r, i in enumerate(chunk):
                toks = tr.assets.tgt_vocab.decode(ys[r].tolist())
                outs[i] = tr.assets.tgt_tokenizer.decode(toks)
        return outs

    runs = {
        "encdec greedy": lambda: tr.translate(words, method="greedy", batch_size=args.batch),
        "encdec beam 5": lambda: tr.translate(words, method="beam", beam_size=5, batch_size=args.batch),
        "torch.nn.Transformer greedy": ref_run,
    }
    times = {k: [] for k in runs}
    outputs = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - start)
    same = sum(x == y for x, y in zip(outputs["encdec greedy"], outputs["torch.nn.Transformer greedy"]))
    print(f"{len(words)} {args.split} inputs, batch {args.batch}, {args.threads} threads; "
          f"greedy outputs identical to the reference for {same}/{len(words)}")
    base = len(words) / statistics.median(times["torch.nn.Transformer greedy"])
    for name, ts in times.items():
        rate = len(words) / statistics.median(ts)
        print(f"  {name:<28} {rate:8,.0f} inputs/s  (median of {len(ts)}; "
              f"{rate / base:.2f}x the reference greedy loop)")


if __name__ == "__main__":
    main()
