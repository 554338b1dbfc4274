"""What the arithmetic allows: the GEMM peak of this machine, and the FLOPs encdec spends per
trained target token and per decoded input, hence the throughput caps they imply.

    python benchmarks/flops.py --peak-only [--size 2048] [--repeats 3] [--threads 2]
    python benchmarks/flops.py [RUN] [--config configs/g2p-small.yaml] [--split test]
                               [--decoders greedy,beam5] [--limit N] [--train-batches 10]
                               [--length-beam L]

1. GEMM peak: fp32 (size x size) @ (size x size) with ``--threads`` threads, after one
   untimed product; GFLOP/s = 2 size^3 / time, median of ``--repeats`` rounds of 5 products.
2. Training FLOPs per target token (EOS included): forward and backward of encdec's training
   loss on the first ``--train-batches`` batches of the training split, in the order
   benchmarks/train_speed.py uses, counted by ``torch.utils.flop_counter.FlopCounterMode`` on
   the real model and batches (padding included, as it is computed). The config is RUN's, or
   ``--config`` without a RUN (no trained weights needed).
3. With RUN: decoding FLOPs per input for each of ``--decoders`` (``greedy``, ``beamK``,
   ``natK`` = Mask-Predict with K passes and the run's length beam or ``--length-beam``),
   counted while encdec decodes the split (``--limit``: its first N inputs) with batch 64, so
   output lengths, finished rows leaving the batch and early exit are those of the real run.

Counted are matrix products (mm, addmm, bmm, attention through the math kernel): what the
GEMM peak bounds. The cap printed is peak / FLOPs, an upper bound on throughput.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encdec.config import Config  # noqa: E402
from encdec.data.dataset import BinarizedSplit, collate, read_eval, token_batches  # noqa: E402
from encdec.data.prepare import load_meta  # noqa: E402
from encdec.data.vocab import PAD  # noqa: E402
from encdec.losses import sequence_loss  # noqa: E402
from encdec.models import build_model  # noqa: E402


def gemm_peak(size: int, repeats: int) -> tuple[float, list[float]]:
    """Median fp32 GFLOP/s of square matrix products, and each round's figure."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        rates.append(5 * 2 * size ** 3 / (time.perf_counter() - start) / 1e9)
    return statistics.median(rates), rates


def counted(fn) -> int:
    """Matrix-product FLOPs of ``fn()``; attention through SDPA's math kernel so it is counted."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def training_flops(cfg: Config, n_batches: int) -> float:
    """Matrix-product FLOPs per target token of a training step (forward + backward)."""
    meta = load_meta(cfg.data.dir)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, meta["src_vocab_size"], meta["tgt_vocab_size"]).train()
    split = BinarizedSplit(cfg.data.dir, "train")
    order = token_batches(split.src_lens, split.tgt_lens, cfg.train.max_tokens, seed=1, epoch=0)
    batches = [collate(split, idx) for idx in order[:n_batches]]

    def fwd_bwd():
        for b in batches:
            loss, _ = sequence_loss(model, b, cfg.train.label_smoothing)
            (loss / b.num_tgt_tokens).backward()

    flops = counted(fwd_bwd)
    tokens = sum(b.num_tgt_tokens for b in batches)
    src = sum(int(b.src_tokens.ne(PAD).sum()) for b in batches)
    params = sum(p.numel() for p in model.parameters())
    per_token = flops / tokens
    print(f"training, {n_batches} batches of train ({tokens:,} target tokens, "
          f"{src / tokens:.2f} source tokens per target token): {per_token / 1e6:.1f} MFLOP per "
          f"target token, forward + backward (6 x {params / 1e6:.2f} M parameters = "
          f"{6 * params / 1e6:.1f} M)")
    return per_token


def decoding_flops(run: str, split: str, decoders: list[str], limit: int,
                   length_beam: int | None) -> dict[str, float]:
    from encdec.nn.packed import unpack_linear_weights
    from encdec.translate import Translator

    tr = Translator.from_run(run)
    # The counter sees aten's matrix products, not oneDNN's packed inner product: count the
    # same products on F.linear (the FLOPs are the same either way).
    unpack_linear_weights(tr.model)
    texts = [e["src"] for e in read_eval(tr.cfg.data.dir, split)]
    texts = texts[:limit] if limit else texts
    print(f"decoding {run}, {len(texts):,} {split} inputs, batch 64:")
    per_input = {}
    for name in decoders:
        if name == "greedy":
            settings = {"method": "greedy"}
        elif name.startswith("beam"):
            settings = {"method": "beam", "beam_size": int(name[4:]), "nbest": 1}
        elif name.startswith("nat"):
            settings = {"method": "nat", "iterations": int(name[3:]), "length_beam": length_beam}
        else:
            sys.exit(f"flops.py: --decoders: unknown {name!r}; use greedy, beamK or natK")
        flops = counted(lambda: tr.translate(texts, batch_size=64, **settings))
        per_input[name] = flops / len(texts)
    return per_input


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", nargs="?", help="trained run: also count decoding FLOPs")
    ap.add_argument("--config", default="configs/g2p-small.yaml", help="without RUN")
    ap.add_argument("--peak-only", action="store_true")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--split", default="test")
    ap.add_argument("--decoders", default="greedy,beam5")
    ap.add_argument("--limit", type=int, default=0, help="decode only the first N inputs")
    ap.add_argument("--length-beam", type=int, help="natK: candidate lengths (default: the run's)")
    ap.add_argument("--train-batches", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    peak, rates = gemm_peak(args.size, args.repeats)
    print(f"GEMM peak, fp32 {args.size}x{args.size}, {args.threads} threads, torch "
          f"{torch.__version__}: {peak:.1f} GFLOP/s (median of {args.repeats}: "
          + ", ".join(f"{r:.1f}" for r in rates) + ")")
    if args.peak_only:
        return
    cfg = Config.load(Path(args.run) / "config.yaml" if args.run else args.config, [])
    per_token = training_flops(cfg, args.train_batches)
    print(f"  -> cap at the GEMM peak: {peak * 1e9 / per_token:,.0f} target tokens/s")
    if args.run:
        for name, flops in decoding_flops(args.run, args.split, args.decoders.split(","),
                                          args.limit, args.length_beam).items():
            print(f"  {name}: {flops / 1e9:.3f} GFLOP per input -> cap at the GEMM peak: "
                  f"{peak * 1e9 / flops:,.0f} inputs/s")


if __name__ == "__main__":
    main()
