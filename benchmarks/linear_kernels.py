"""One linear layer's products alone: PyTorch's F.linear (MKL on x86 builds) against oneDNN's
inner product on a packed weight (``encdec/nn/packed.py``), in GFLOP/s.

    python benchmarks/linear_kernels.py [--threads 1] [--shapes 5x256x7809,64x256x7809,...]
                                        [--backward]

A shape MxKxN is M rows through a K -> N layer (2 M K N FLOPs). Each product runs once
untimed, then ``--repeats`` rounds of enough calls for ~0.2 s; the fastest round is kept for
each kernel (a floor on noise). ``--backward`` also times the two gradient products of
training: the input's (grad_y W: F.linear against oneDNN on the packed W^T) and the weight's
(grad_y^T x: torch.mm against oneDNN on x^T packed per call, as it would have to be).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

DEFAULT = "1x256x1024,5x256x7809,64x256x256,64x256x1024,64x1024x256,64x256x7809,6000x256x7809"


def rate(fn, flops: float, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    fn()
    calls = max(1, int(0.2 / max(time.perf_counter() - start, 1e-6)))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return flops / best / 1e9


def onednn(x, w):
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", default=DEFAULT)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backward", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pack = torch.ops.mkldnn._reorder_linear_weight
    print(f"{args.threads} thread(s), torch {torch.__version__}; GFLOP/s, F.linear / oneDNN packed")
    print("| M x K x N | forward |" + (" input grad | weight grad |" if args.backward else ""))
    print("|---|---:|" + ("---:|---:|" if args.backward else ""))
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            m, k, n = (int(v) for v in shape.split("x"))
            x, w, gy = torch.randn(m, k), torch.randn(n, k), torch.randn(m, n)
            flops = 2.0 * m * k * n
            wp, wtp = pack(w, m), pack(w.t().contiguous(), m)
            row = [f"{rate(lambda: F.linear(x, w), flops, args.repeats):.0f} / "
                   f"{rate(lambda: onednn(x, wp), flops, args.repeats):.0f}"]
            if args.backward:
                row.append(f"{rate(lambda: F.linear(gy, w.t()), flops, args.repeats):.0f} / "
                           f"{rate(lambda: onednn(gy, wtp), flops, args.repeats):.0f}")
                row.append(f"{rate(lambda: gy.t() @ x, flops, args.repeats):.0f} / "
                           f"{rate(lambda: onednn(gy.t(), pack(x.t().contiguous(), n)), flops, args.repeats):.0f}")
            print(f"| {m} x {k} x {n} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
