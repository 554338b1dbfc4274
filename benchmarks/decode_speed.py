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

Against CTranslate2 on the same weights:

    python benchmarks/decode_speed.py RUN --engines encdec[,encdec-unpacked],ctranslate2
                                      [--batches 64,1] [--thread-counts 1,2] [--batch1-limit 300]

encdec's own search and CTranslate2's (``translate_batch`` on the fp32 export that ``encdec
export`` writes, RUN/export/ctranslate2, made on first use) decode the split, greedy and beam
``--beam``, at every batch size and thread count: one table of inputs/s (words for G2P,
sentences for translation), medians of ``--repeats`` alternating runs after an untimed
warm-up each. Both tokenize and detokenize with the run's tokenizers and sort the inputs by
length before batching (CTranslate2 inside ``translate_batch``, given all inputs at once).
CTranslate2 gets the run's length penalty and the longest length limit of the inputs (one
number per call; outputs end at </s> long before it), and runs with ``intra_threads`` = the
thread count and one translator. Batch-1 rows decode the first ``--batch1-limit`` inputs only
(the same ones for both engines). ``encdec-unpacked`` is encdec with its linear layers on
PyTorch's ``F.linear`` instead of oneDNN-packed weights (``encdec/nn/packed.py``), to show what
the packing gives. The outputs are compared and scored: CTranslate2
renormalizes without <pad>/<s> and ends beams its own way, so a few may differ (``encdec
translate --engine ctranslate2`` makes them equal; that is not what is timed here).
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
from encdec.nn.packed import unpack_linear_weights  # noqa: E402
from encdec.translate import Translator  # noqa: E402

DEFAULT_RUN = "runs/bench-g2p"


def alternate(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Each run once untimed (warm-up), then ``repeats`` rounds in turn, the order reversed every
    other round; returns the last outputs and the seconds of every timed run, by name."""
    outputs = {name: fn() for name, fn in runs.items()}
    times = {name: [] for name in runs}
    for r in range(repeats):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            start = time.perf_counter()
            outputs[name] = runs[name]()
            times[name].append(time.perf_counter() - start)
    return outputs, times


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


def ctranslate2_decoder(tr: Translator, translator, batch: int, beam: int, cfg):
    """inputs -> output strings by CTranslate2's own search on the export of the same weights."""
    a = tr.assets

    def run(texts: list[str]) -> list[str]:
        tokens = [a.src_tokenizer.encode(t) for t in texts]
        limit = int(cfg.max_len_a * max(len(t) for t in tokens) + cfg.max_len_b)
        results = translator.translate_batch(
            tokens, max_batch_size=batch, beam_size=beam, length_penalty=cfg.length_penalty,
            max_decoding_length=limit, return_scores=False)
        return [a.tgt_tokenizer.decode(r.hypotheses[0]) for r in results]

    return run


def compare_engines(args, tr: Translator, words: list[str], refs) -> None:
    import ctranslate2

    from encdec.export import ensure_export

    engines = args.engines.split(",")
    for engine in engines:
        if engine not in ("encdec", "encdec-unpacked", "ctranslate2"):
            sys.exit("decode_speed.py: --engines takes encdec, encdec-unpacked and ctranslate2, "
                     f"not {engine!r}")
    translators_by_engine = {"encdec": tr}
    if "encdec-unpacked" in engines:
        plain = Translator.from_run(args.run)
        unpack_linear_weights(plain.model)  # F.linear (PyTorch's BLAS) in every layer
        translators_by_engine["encdec-unpacked"] = plain
    batches = [int(b) for b in args.batches.split(",")]
    thread_counts = [int(t) for t in args.thread_counts.split(",")]
    K = args.beam
    metric = tr.assets.meta["metric"]
    key = "wer" if metric == "g2p" else "bleu"
    translators = {}
    if "ctranslate2" in engines:
        export = ensure_export(args.run, tr.checkpoint_dir)
        translators = {t: ctranslate2.Translator(str(export), device="cpu",
                                                 compute_type="float32", intra_threads=t,
                                                 inter_threads=1)
                       for t in thread_counts}
    table: dict = {}
    notes = []
    for threads in thread_counts:
        torch.set_num_threads(threads)
        for batch in batches:
            texts = words if batch > 1 or not args.batch1_limit else words[: args.batch1_limit]
            for method, beam in (("greedy", 1), (f"beam {K}", K)):
                cfg = tr.decode_config(method="greedy" if beam == 1 else "beam", beam_size=K,
                                       nbest=1)
                runs = {}
                for name in engines:
                    if name in translators_by_engine:
                        runs[name] = (lambda t=translators_by_engine[name], b=batch,
                                      m=cfg.method: t.translate(texts, method=m, beam_size=K,
                                                                nbest=1, batch_size=b))
                if "ctranslate2" in engines:
                    fn = ctranslate2_decoder(tr, translators[threads], batch, beam, cfg)
                    runs["ctranslate2"] = (lambda f=fn: f(texts))
                outputs, times = alternate(runs, args.repeats)
                for name, ts in times.items():
                    table[(name, method, batch, threads)] = len(texts) / statistics.median(ts)
                    print(f"  {name:<12} {method:<7} batch {batch:<3} {threads} thread(s): "
                          f"{len(texts) / statistics.median(ts):8,.1f} inputs/s (runs: "
                          + ", ".join(f"{len(texts) / t:,.1f}" for t in ts) + ")", flush=True)
                if threads == thread_counts[0]:
                    quality = {n: score(metric, o, refs[: len(texts)])[key]
                               for n, o in outputs.items()}
                    line = f"{method}, batch {batch}: {args.split} {key.upper()} " + ", ".join(
                        f"{n} {q:.2f}" for n, q in quality.items())
                    names = list(outputs)
                    for other in names[1:]:
                        same = sum(x == y for x, y in zip(outputs[names[0]], outputs[other]))
                        line += f"; {names[0]} and {other} equal for {same}/{len(texts)}"
                    notes.append(line)
    cols = [(b, t) for b in batches for t in thread_counts]
    print(f"\n{args.run}: {len(words)} {args.split} inputs (batch 1: the first "
          f"{min(len(words), args.batch1_limit or len(words))}), inputs/s, median of "
          f"{args.repeats}; torch {torch.__version__}, ctranslate2 {ctranslate2.__version__} "
          "float32")
    print("| engine | search | " + " | ".join(f"batch {b}, {t} thr" for b, t in cols) + " |")
    print("|---|---|" + "---:|" * len(cols))
    for method in ("greedy", f"beam {K}"):
        for name in engines:
            print(f"| {name} | {method} | " + " | ".join(
                f"{table[(name, method, b, t)]:,.0f}" for b, t in cols) + " |")
        for name in engines:
            if name != "ctranslate2" and "ctranslate2" in engines:
                print(f"| {name} / ctranslate2 | {method} | " + " | ".join(
                    f"{table[(name, method, b, t)] / table[('ctranslate2', method, b, t)]:.2f}x"
                    for b, t in cols) + " |")
        if "encdec" in engines and "encdec-unpacked" in engines:
            print(f"| encdec / encdec-unpacked | {method} | " + " | ".join(
                f"{table[('encdec', method, b, t)] / table[('encdec-unpacked', method, b, t)]:.2f}x"
                for b, t in cols) + " |")
    for note in notes:
        print("  " + note)


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
    ap.add_argument("--engines", default="encdec,reference",
                    help="encdec,reference (default), or a list of encdec, encdec-unpacked "
                         "and ctranslate2")
    ap.add_argument("--batches", default="64,1", help="with ctranslate2: batch sizes")
    ap.add_argument("--thread-counts", default="1,2", help="with ctranslate2: thread counts")
    ap.add_argument("--batch1-limit", type=int, default=300,
                    help="with ctranslate2: batch-1 rows decode the first N inputs (0: all)")
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
    if args.engines != "encdec,reference":
        compare_engines(args, tr, words, refs)
        return
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
    outputs, times = alternate(runs, args.repeats)
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
