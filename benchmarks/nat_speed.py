"""Speed/quality of non-autoregressive decoding against the autoregressive model it stands beside.

    python benchmarks/nat_speed.py --at RUN --nat NAME=RUN [NAME=RUN ...] [--split test]
                                   [--iterations 1,4,10] [--length-beam 1,3] [--repeats 2]
                                   [--batch-size 64] [--device cpu|cuda] [--limit N]
                                   [--early-exit on,off] [--rerank]

Rows: AT greedy, AT beam 5, and each NAT run at each number of Mask-Predict iterations. Each row
decodes the whole split with batch 64 by default (tokenization and detokenization included); rows run in
turn, ``--repeats`` times, and the median inputs/s is reported with its ratio to AT beam 5
(the reference, measured in the same process). Quality is the task metric on the split.
With ``--rerank``, each NAT row with a length beam above 1 is also run with the AT model
re-scoring its candidates (noisy parallel decoding); the reranking time counts.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encdec.data.dataset import read_eval  # noqa: E402
from encdec.metrics import score  # noqa: E402
from encdec.translate import Translator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--at", required=True, help="autoregressive run (the reference)")
    ap.add_argument("--nat", nargs="+", required=True, metavar="NAME=RUN")
    ap.add_argument("--split", default="test")
    ap.add_argument("--iterations", default="1,4,10")
    ap.add_argument("--length-beam", default="3", help="one or more, e.g. 1,3")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--limit", type=int, default=0, help="only the first N inputs of the split")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--early-exit", default="on",
                    help="on, off or on,off: Mask-Predict stops refining an output a pass left "
                         "unchanged (on) or always runs every pass (off)")
    ap.add_argument("--rerank", action="store_true",
                    help="also rerank the NAT length-beam candidates with the AT model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    at = Translator.from_run(args.at, device=args.device)
    entries = read_eval(at.cfg.data.dir, args.split)
    entries = entries[:args.limit] if args.limit else entries
    texts, refs = [e["src"] for e in entries], [e["refs"] for e in entries]
    metric = at.assets.meta["metric"]
    key = "wer" if metric == "g2p" else "bleu"
    rows = [("AT greedy", at, {"method": "greedy"}), ("AT beam 5", at, {"beam_size": 5})]
    for item in args.nat:
        name, run = item.split("=", 1)
        tr = Translator.from_run(run, device=args.device)
        for lb in (int(x) for x in args.length_beam.split(",")):
            for k in (int(x) for x in args.iterations.split(",")):
                for ee in args.early_exit.split(","):
                    if k == 1 and ee == "off" and "on" in args.early_exit:
                        continue  # one pass: nothing to exit early from
                    label = f"NAT {name}, {k} iter, length beam {lb}"
                    label += ", every pass" if ee == "off" and k > 1 else ""
                    settings = {"method": "nat", "iterations": k, "length_beam": lb,
                                "early_exit": ee == "on"}
                    rows.append((label, tr, settings))
                    if args.rerank and lb > 1:
                        rows.append((label + ", AT rerank", tr, dict(settings, rerank=at)))
    speeds: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    quality: dict[str, float] = {}
    for _, tr, settings in rows:  # warm-up (allocator, kernels) outside the timings
        tr.translate(texts[:2 * args.batch_size], batch_size=args.batch_size, **settings)
    for r in range(args.repeats):
        for name, tr, settings in rows:
            start = time.perf_counter()
            out = tr.translate(texts, batch_size=args.batch_size, **settings)
            speeds[name].append(len(texts) / (time.perf_counter() - start))
            quality[name] = score(metric, out, refs)[key]
            print(f"  run {r + 1}: {name}: {speeds[name][-1]:.0f} inputs/s, {key} {quality[name]:.2f}",
                  flush=True)
    ref = statistics.median(speeds["AT beam 5"])
    print(f"\n{args.split} split, {len(texts)} inputs, batch {args.batch_size}, "
          f"{args.device if args.device != 'cpu' else f'{args.threads} CPU threads'}; "
          f"median of {args.repeats}\n")
    print(f"| decoder | inputs/s | vs AT beam 5 | test {key.upper()} |")
    print("|---|---|---|---|")
    for name, _, _ in rows:
        s = statistics.median(speeds[name])
        print(f"| {name} | {s:,.0f} | {s / ref:.2f}x | {quality[name]:.2f} |")


if __name__ == "__main__":
    main()
