"""Decoding speed on a whole split, batch 64: encdec greedy and beam search against a plain
PyTorch incremental loop on the same weights (``benchmarks/reference.py``) -- cached greedy
against cached greedy, beam against beam.

    python benchmarks/decode_speed.py [RUN] [--split test] [--repeats 3] [--beam 5]
                                      [--batch 64] [--limit N]

RUN defaults to runs/bench-g2p, the run `make bench` trains when it is missing
(`encdec train configs/g2p-small.yaml train.max_minutes=10 train.run_dir=runs/bench-g2p`).

Both sides tokenize, sort the inputs longest first, decode batches of 64, and detokenize;
inputs/s counts all of it. The reference keeps per-layer self-attention key/value caches,
projects the cross-attention keys/values once per input, drops finished inputs from the batch,
and uses the run's decoding limits and length penalty. Every method first makes one untimed
pass over the split (warm-up); then the methods run in turn (the order reversed every other
round) ``--repeats`` times and the medians are printed with the ratio of encdec to its
reference. The outputs of encdec and the reference are compared (they carry the same weights
and follow the same search rules, so they should agree on every input) and scored.

Differences that remain: the reference's encoder is nn.TransformerEncoder (its inference fast
path when PyTorch takes it); the reference copies each input's cross-attention keys/values to
its beams once, where encdec shares one copy between the beams (a design choice measured here).
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

from encdec.data.dataset import pad, read_eval  # noqa: E402
from encdec.metrics import score  # noqa: E402
from encdec.translate import Translator  # noqa: E402

DEFAULT_RUN = "runs/bench-g2p"


def reference_decoder(tr: Translator, ref: ReferenceTransformer, batch: int, search):
    """inputs -> output strings, the way encdec's decode_texts batches them."""
    a = tr.assets

    def run(texts: list[str]) -> list[str]:
        ids = [a.src_vocab.encode(a.src_tokenizer.encode(t)) for t in texts]
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # longest first
        outs = [""] * len(ids)
        for s in range(0, len(order), batch):
            chunk = order[s:s + batch]
            for i, out in zip(chunk, search(pad([ids[i] for i in chunk]).to(tr.device))):
                outs[i] = a.tgt_tokenizer.decode(a.tgt_vocab.decode(out))
        return outs

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", nargs="?", default=DEFAULT_RUN,
                    help=f"trained run directory (default {DEFAULT_RUN})")
    ap.add_argument("--split", default="test")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="only the first N inputs")
    args = ap.parse_args()
    if not (Path(args.run) / "config.yaml").exists():
        sys.exit(f"decode_speed.py: no trained run at {args.run}; train one with `encdec train "
                 f"configs/g2p-small.yaml train.max_minutes=10 train.run_dir={args.run}` "
                 "(`make bench` does) or name a run directory")
    torch.set_num_threads(args.threads)
    tr = Translator.from_run(args.run)
    entries = read_eval(tr.cfg.data.dir, args.split)
    entries = entries[: args.limit] if args.limit else entries
    words, refs = [e["src"] for e in entries], [e["refs"] for e in entries]
    ref = ReferenceTransformer(tr.cfg.model, tr.assets.meta["src_vocab_size"],
                               tr.assets.meta["tgt_vocab_size"]).load_encdec(tr.model)
    ref = ref.to(tr.device).eval()
    g = tr.decode_config(method="greedy")
    bm = tr.decode_config(method="beam", beam_size=args.beam, nbest=1)
    K = args.beam
    runs = {
        "encdec greedy": lambda: tr.translate(words, method="greedy", batch_size=args.batch),
        "reference greedy": reference_decoder(
            tr, ref, args.batch, lambda src: ref.greedy(src, g.max_len_a, g.max_len_b)),
        f"encdec beam {K}": lambda: tr.translate(words, method="beam", beam_size=K, nbest=1,
                                                 batch_size=args.batch),
        f"reference beam {K}": reference_decoder(
            tr, ref, args.batch,
            lambda src: ref.beam(src, K, bm.length_penalty, bm.max_len_a, bm.max_len_b)),
    }
    runs = {name: (fn if name.startswith("encdec") else (lambda f=fn: f(words)))
            for name, fn in runs.items()}
    outputs = {name: fn() for name, fn in runs.items()}  # warm-up, untimed
    times = {name: [] for name in runs}
    for r in range(args.repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            start = time.perf_counter()
            outputs[name] = runs[name]()
            times[name].append(time.perf_counter() - start)
    metric = tr.assets.meta["metric"]
    key = "wer" if metric == "g2p" else "bleu"
    print(f"{args.run}: {len(words)} {args.split} inputs, batch {args.batch}, "
          f"{args.threads} threads, torch {torch.__version__}; "
          f"max length {g.max_len_a} * len(src) + {g.max_len_b}, length penalty {bm.length_penalty}")
    for kind in ("greedy", f"beam {K}"):
        same = sum(x == y for x, y in zip(outputs[f"encdec {kind}"], outputs[f"reference {kind}"]))
        quality = score(metric, outputs[f"encdec {kind}"], refs)[key]
        print(f"  {kind}: outputs identical to the reference's for {same}/{len(words)}; "
              f"{args.split} {key.upper()} {quality:.2f}")
    for name, ts in times.items():
        rate = len(words) / statistics.median(ts)
        line = f"  {name:<18} {rate:8,.0f} inputs/s (median of {len(ts)}: " + \
            ", ".join(f"{len(words) / t:,.0f}" for t in ts) + ")"
        if name.startswith("encdec"):
            base = len(words) / statistics.median(times[name.replace("encdec", "reference")])
            line += f"  {rate / base:.2f}x the reference"
        print(line)


if __name__ == "__main__":
    main()
