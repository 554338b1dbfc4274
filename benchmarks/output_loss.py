"""The output layer and the label-smoothed loss, forward and backward: the logits whole with the
log-probabilities in a second buffer (``train.chunked_loss=false``) against the loss and its
gradient written chunk by chunk into the logits' own buffer (the default;
``encdec.losses.output_layer_loss``).

    python benchmarks/output_loss.py [--threads 2] [--tokens 5300] [--d-model 256]
                                     [--vocab 7809] [--chunks 1048576,4194304,16777216]
                                     [--repeats 15]

The defaults are the Bible presets' output layer at a 6,000-token batch (about 5,300 real
target positions, 256 wide, 7,809 subwords, label smoothing 0.1). Each round runs every
variant once, in turn, from the same hidden rows and weight; a round's order rotates. Printed:
median and fastest milliseconds over ``--repeats`` rounds after one untimed round, and each
variant's largest difference from the whole-logits path in the loss and the gradients.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encdec import losses  # noqa: E402


class _Core:
    """What a model gives the loss: its ``output`` layer and ``logits``."""

    def __init__(self, output: nn.Linear):
        self.output = output

    def logits(self, hidden):
        return self.output(hidden)


def run_once(core, hidden, target, chunked: bool, chunk_logits: int):
    """(seconds, loss, grad of hidden, grad of weight) of one forward and backward."""
    losses.CHUNK_LOGITS = chunk_logits
    core.output.weight.grad = None
    h = hidden.clone().requires_grad_()
    start = time.perf_counter()
    loss, _ = losses.output_layer_loss(core, h, target, 0.1, chunked=chunked)
    (loss / target.numel()).backward()
    seconds = time.perf_counter() - start
    return seconds, loss.detach(), h.grad, core.output.weight.grad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=5300)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=7809)
    ap.add_argument("--chunks", default="1048576,4194304,16777216",
                    help="logits per chunk (CHUNK_LOGITS) of the in-place variants, comma-separated")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    core = _Core(nn.Linear(args.d_model, args.vocab, bias=False))
    hidden = torch.randn(args.tokens, args.d_model)
    target = torch.randint(4, args.vocab, (args.tokens,))
    variants = [("whole logits", False, losses.CHUNK_LOGITS)] + [
        (f"in place, {int(c):,} logits per chunk", True, int(c)) for c in args.chunks.split(",")]
    default = losses.CHUNK_LOGITS
    times = {name: [] for name, _, _ in variants}
    results = {}
    try:
        for r in range(args.repeats + 1):
            shift = r % len(variants)
            for name, chunked, chunk in variants[shift:] + variants[:shift]:
                seconds, *res = run_once(core, hidden, target, chunked, chunk)
                if r:
                    times[name].append(seconds)
                results[name] = res
    finally:
        losses.CHUNK_LOGITS = default
    ref = results["whole logits"]
    print(f"{args.tokens:,} tokens x {args.d_model} -> {args.vocab:,}, {args.threads} threads, "
          f"torch {torch.__version__}; forward and backward, {args.repeats} rounds "
          f"(default chunk: {default:,} logits)")
    print("| variant | median ms | fastest ms | whole / variant (medians) | max diff loss, grads |")
    print("|---|---:|---:|---:|---|")
    base = statistics.median(times["whole logits"])
    for name, _, _ in variants:
        med = statistics.median(times[name])
        diff = [float((a - b).abs().max()) for a, b in zip(results[name], ref)]
        print(f"| {name} | {1e3 * med:.0f} | {1e3 * min(times[name]):.0f} | {base / med:.2f}x | "
              + ", ".join(f"{d:.1e}" for d in diff) + " |")


if __name__ == "__main__":
    main()
