"""How much of a NAT model's error is its length predictor's.

    python benchmarks/nat_length.py --nat RUN [--split dev] [--data DIR] [--iterations 1,4]

Prints the length predictor's recall at 1, 3 and 5 (the share of inputs for which a reference's
length, in target tokens, is among the k most likely lengths), then the task metric of
Mask-Predict with the predicted length (length beam 1) and with the first reference's length
given (``mask_predict(..., lengths=)``): the gap between the two is what a perfect length
predictor would gain. Quality only; no timings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encdec.data.dataset import pad, read_eval  # noqa: E402
from encdec.decoding.nat import mask_predict  # noqa: E402
from encdec.metrics import score  # noqa: E402
from encdec.translate import Translator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nat", required=True, help="non-autoregressive run")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--data", help="data directory with the split (default: the run's)")
    ap.add_argument("--iterations", default="1,4")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tr = Translator.from_run(args.nat)
    a, model = tr.assets, tr.model
    entries = read_eval(args.data or tr.cfg.data.dir, args.split)
    src_ids = [a.src_vocab.encode(a.src_tokenizer.encode(e["src"])) for e in entries]
    ref_lengths = [[len(a.tgt_tokenizer.encode(r)) for r in e["refs"]] for e in entries]
    order = sorted((i for i, s in enumerate(src_ids) if s), key=lambda i: -len(src_ids[i]))
    iterations = [int(k) for k in args.iterations.split(",")]
    hits = torch.zeros(3)
    outputs = {(k, given): [""] * len(entries) for k in iterations for given in (False, True)}
    with torch.no_grad():
        for start in range(0, len(order), args.batch_size):
            chunk = order[start:start + args.batch_size]
            src = pad([src_ids[i] for i in chunk])
            enc = model.encode(src)
            top = model.lengths_of_classes(enc, model.length_log_probs(enc).topk(5, -1)[1])
            for r, i in enumerate(chunk):
                for j, k in enumerate((1, 3, 5)):
                    hits[j] += bool(set(top[r, :k].tolist()) & set(ref_lengths[i]))
            first_ref = torch.tensor([ref_lengths[i][0] for i in chunk])
            for k in iterations:
                for given in (False, True):
                    hyps = mask_predict(model, src, iterations=k,
                                        lengths=first_ref if given else None)
                    for i, h in zip(chunk, hyps):
                        outputs[(k, given)][i] = a.tgt_tokenizer.decode(
                            a.tgt_vocab.decode(h[0].tokens))
    n = len(entries)
    print(f"{args.split} split, {n} inputs; length predictor recall@1 {100 * hits[0] / n:.1f}%, "
          f"@3 {100 * hits[1] / n:.1f}%, @5 {100 * hits[2] / n:.1f}%\n")
    metric = a.meta["metric"]
    key = "wer" if metric == "g2p" else "bleu"
    refs = [e["refs"] for e in entries]
    print("| passes | predicted length | reference length |\n|---|---|---|")
    for k in iterations:
        q = [score(metric, outputs[(k, g)], refs)[key] for g in (False, True)]
        print(f"| {k} | {key.upper()} {q[0]:.2f} | {key.upper()} {q[1]:.2f} |")


if __name__ == "__main__":
    main()
