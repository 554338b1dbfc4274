"""Where encdec's decoding time goes: the linear layers (their GFLOP/s), attention, cache
gathers and copies, the rest of the operators, and Python -- greedy and beam search.

    python benchmarks/decode_profile.py [RUN] [--split test] [--limit 1000] [--batches 64,1]
                                        [--threads 1] [--beam 5] [--unpacked]

RUN (default runs/bench-g2p) decodes the first ``--limit`` inputs of the split (batch 1: the
first ``--batch1-limit``) the way ``encdec translate`` does, once untimed, once timed (the
inputs/s printed), once under ``torch.profiler`` (CPU, shapes recorded). Operators are grouped
by self time; "Python and framework" is the profiled run's wall time less the operators' self
time (the profiler's own cost per operator lands there too, so it is an upper bound). The
linear layers' GFLOP/s is 2 M N K per call over their self time; compare it with this machine's
one-thread GEMM peak (``python benchmarks/flops.py --peak-only --threads 1``). ``--unpacked``
profiles F.linear (PyTorch's BLAS) instead of the oneDNN-packed weights inference uses.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from encdec.data.dataset import read_eval
from encdec.nn.packed import unpack_linear_weights
from encdec.translate import Translator

LINEAR = ("mkldnn::_linear_pointwise", "aten::addmm", "aten::mm")
GROUPS = {
    "attention (products, softmax, masks)": ("aten::bmm", "aten::_softmax", "aten::masked_fill",
                                             "aten::masked_fill_",
                                             "aten::_scaled_dot_product_flash_attention_for_cpu"),
    "gathers, appends and copies (cache, reshapes)": ("aten::index_select", "aten::cat",
                                                      "aten::copy_", "aten::index",
                                                      "aten::index_put_"),
    "norms, residuals, activations": ("aten::native_layer_norm", "aten::add", "aten::add_",
                                      "aten::mul", "aten::clamp_min_", "aten::clamp_min",
                                      "aten::relu", "aten::gelu", "aten::embedding"),
    "search (log-softmax, top-k, argmax)": ("aten::_log_softmax", "aten::topk", "aten::argmax",
                                            "aten::gather", "aten::where", "aten::eq"),
}


def linear_flops(shapes) -> float:
    """2 M N K of one linear call from its recorded input shapes (None when unknown)."""
    if len(shapes) >= 2 and len(shapes[0]) >= 2 and len(shapes[1]) == 2:
        x, w = shapes[0], shapes[1]
        if x and w:  # _linear_pointwise (x, (N, K)) and mm (M, K) @ (K, N)
            rows = math.prod(x[:-1])
            return 2.0 * rows * x[-1] * (w[0] if w[1] == x[-1] else w[1])
    if len(shapes) >= 3 and len(shapes[1]) == 2 and len(shapes[2]) == 2:  # addmm (b, x, w^T)
        (m, k), (_, n) = shapes[1], shapes[2]
        return 2.0 * m * k * n
    return 0.0


def profile_once(tr: Translator, texts: list[str], method: str, beam: int, batch: int) -> None:
    run = lambda: tr.translate(texts, method=method, beam_size=beam, nbest=1,  # noqa: E731
                               batch_size=batch)
    run()
    start = time.perf_counter()
    run()
    plain = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
    by_name = defaultdict(float)
    flops = seconds = 0.0
    for e in prof.key_averages(group_by_input_shape=True):
        by_name[e.key] += e.self_cpu_time_total / 1e6
        if e.key in LINEAR:
            flops += linear_flops(e.input_shapes) * e.count
            seconds += e.self_cpu_time_total / 1e6
    ops = sum(by_name.values())
    rows = [("linear layers", sum(by_name.pop(k, 0.0) for k in LINEAR))]
    for group, names in GROUPS.items():
        rows.append((group, sum(by_name.pop(k, 0.0) for k in names)))
    rows.append(("other operators", sum(by_name.values())))
    rows.append(("Python and framework (wall - operators)", max(wall - ops, 0.0)))
    name = "greedy" if method == "greedy" else f"beam {beam}"
    print(f"\n{name}, batch {batch}, {len(texts)} inputs: {len(texts) / plain:,.1f} inputs/s "
          f"unprofiled; profiled {wall:.2f} s")
    print("| where | seconds | share |")
    print("|---|---:|---:|")
    for label, sec in rows:
        print(f"| {label} | {sec:.3f} | {100 * sec / wall:.1f} % |")
    if seconds:
        print(f"linear layers: {flops / 1e9:.2f} GFLOP at {flops / seconds / 1e9:.1f} GFLOP/s; "
              "the largest other operators: " + ", ".join(
                  f"{k} {v:.3f} s" for k, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:4]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", nargs="?", default="runs/bench-g2p")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--batches", default="64,1")
    ap.add_argument("--batch1-limit", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--beam", type=int, default=5)
    ap.add_argument("--unpacked", action="store_true",
                    help="F.linear in every layer instead of the oneDNN-packed weights")
    args = ap.parse_args()
    if not (Path(args.run) / "config.yaml").exists():
        sys.exit(f"decode_profile.py: no trained run at {args.run}")
    torch.set_num_threads(args.threads)
    tr = Translator.from_run(args.run)
    if args.unpacked:
        unpack_linear_weights(tr.model)
    texts = [e["src"] for e in read_eval(tr.cfg.data.dir, args.split)][: args.limit]
    print(f"{args.run}: {args.threads} thread(s), torch {torch.__version__}, linear layers "
          + ("F.linear" if args.unpacked else "oneDNN-packed"))
    for batch in (int(b) for b in args.batches.split(",")):
        subset = texts if batch > 1 else texts[: args.batch1_limit]
        for method in ("greedy", "beam"):
            profile_once(tr, subset, method, args.beam, batch)


if __name__ == "__main__":
    main()
