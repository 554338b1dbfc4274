"""Attention on the CPU: SDPA's kernel against the explicit products and softmax that encdec
uses for short key sequences (``EXPLICIT_MAX_KEYS`` in ``encdec/nn/attention.py``).

    python benchmarks/attention_kernels.py [--threads 2] [--lengths 8,12,16,24,32,48,64,96,160]
                                           [--tokens 4000] [--repeats 8]
    python benchmarks/attention_kernels.py --train CONFIG [--warmup 10] [--steps 40]
                                           [--repeats 3] [--max-keys 48]

Kernel level (default): for each length L, self-attention over a batch of about ``--tokens``
tokens (L queries and L keys per sequence, 4 heads of 64, keys padded at random for the
non-causal rows, causal rows unpadded), forward and backward from a fused QKV projection's
output as the model has it (heads as strided views). Median milliseconds of ``--repeats``
rounds after two untimed ones, the two paths alternating; the largest difference between
their outputs and input gradients is printed too.

Training level (``--train``): the trainer's own step (``train_speed.py --one encdec``) on the
same batches, in fresh processes that alternate, with the explicit path off
(``EXPLICIT_MAX_KEYS = 0``: SDPA everywhere) and at ``--max-keys``; medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from encdec.nn.attention import _attention_with_weights  # noqa: E402

# Runs train_speed.py's one-system measurement with the module's threshold set first.
_WITH_THRESHOLD = ("import runpy, sys; import encdec.nn.attention as a; "
                   "a.EXPLICIT_MAX_KEYS = int(sys.argv.pop(1)); sys.argv[0] = {script!r}; "
                   "runpy.run_path({script!r}, run_name='__main__')")


def sdpa(q, k, v, mask, causal):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def explicit(q, k, v, mask, causal):
    return _attention_with_weights(q, k, v, mask, causal)[0]


def kernels(args) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    heads, dim = 4, 64
    print(f"{args.threads} thread(s), torch {torch.__version__}; self-attention forward + backward, "
          f"~{args.tokens} tokens per batch, {heads} heads of {dim}; median ms of {args.repeats}")
    print("| keys | sequences | causal | SDPA | explicit | SDPA / explicit | max difference |")
    print("|---:|---:|---|---:|---:|---:|---:|")
    for length in (int(v) for v in args.lengths.split(",")):
        batch = max(args.tokens // length, 1)
        for causal in (False, True):
            x = torch.randn(batch, length, 3 * heads * dim, requires_grad=True)
            lens = torch.randint(length // 2, length + 1, (batch,))
            mask = None if causal else (torch.arange(length)[None] < lens[:, None])[:, None, None]
            grad = torch.randn(batch, heads, length, dim)
            times, results = {"sdpa": [], "explicit": []}, {}
            for r in range(args.repeats + 2):
                for name, fn in ((("sdpa", sdpa), ("explicit", explicit)) if r % 2 == 0
                                 else (("explicit", explicit), ("sdpa", sdpa))):
                    x.grad = None
                    start = time.perf_counter()
                    q, k, v = (x[..., i * heads * dim:(i + 1) * heads * dim]
                               .view(batch, length, heads, dim).transpose(1, 2) for i in range(3))
                    out = fn(q, k, v, mask, causal)
                    out.backward(grad)
                    if r >= 2:
                        times[name].append(time.perf_counter() - start)
                    results[name] = (out.detach(), x.grad.clone())
            diff = max(float((a - b).abs().max()) for a, b in zip(results["sdpa"], results["explicit"]))
            ms = {n: 1e3 * statistics.median(t) for n, t in times.items()}
            print(f"| {length} | {batch} | {'yes' if causal else 'no'} | {ms['sdpa']:.1f} | "
                  f"{ms['explicit']:.1f} | {ms['sdpa'] / ms['explicit']:.2f}x | {diff:.1e} |",
                  flush=True)


def training(args) -> None:
    from train_speed import first_batches, save_batches  # the batches train_speed.py times

    from encdec.config import Config
    from encdec.data.dataset import BinarizedSplit

    cfg = Config.load(args.train, [])
    order = first_batches(cfg, BinarizedSplit(cfg.data.dir, "train"), args.warmup + args.steps)
    script = str(ROOT / "benchmarks" / "train_speed.py")
    code = _WITH_THRESHOLD.format(script=script)
    settings = {"SDPA (0 keys)": 0, f"explicit up to {args.max_keys} keys": args.max_keys}
    rates = {name: [] for name in settings}
    rss = {name: [] for name in settings}
    with tempfile.TemporaryDirectory() as tmp:
        batches = Path(tmp) / "batches.npz"
        save_batches(order, batches)
        names = list(settings)
        for r in range(args.repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                cmd = [sys.executable, "-c", code, str(settings[name]), "--one", "encdec",
                       "--config", args.train, "--warmup", str(args.warmup), "--steps",
                       str(args.steps), "--threads", str(args.threads), "--batches", str(batches)]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if out.returncode != 0:
                    sys.exit(f"{out.stderr}\nfailed: {' '.join(cmd)}")
                result = json.loads(out.stdout.strip().splitlines()[-1])
                rates[name].append(result["tokens_per_s"])
                rss[name].append(result["peak_rss_mb"])
            print(f"  run {r + 1}: " + "   ".join(f"{n} {rates[n][-1]:,.0f}" for n in names)
                  + " tok/s", flush=True)
    base = statistics.median(rates[names[0]])
    print(f"\n{args.train}: target tokens/s over steps {args.warmup}-{args.warmup + args.steps}, "
          f"{args.threads} threads, median of {args.repeats}")
    print("| attention | tokens/s | vs SDPA | peak RSS |")
    print("|---|---:|---:|---:|")
    for n in names:
        rate = statistics.median(rates[n])
        print(f"| {n} | {rate:,.0f} | {rate / base:.3f}x | {statistics.median(rss[n]):,.0f} MB |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lengths", default="8,12,16,24,32,48,64,96,160")
    ap.add_argument("--tokens", type=int, default=4000)
    ap.add_argument("--repeats", type=int, help="rounds per setting (default 8; 3 with --train)")
    ap.add_argument("--train", metavar="CONFIG", help="time training steps instead of kernels")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--max-keys", type=int, default=48)
    args = ap.parse_args()
    if args.train:
        args.repeats = args.repeats or 3
        return training(args)
    args.repeats = args.repeats or 8
    kernels(args)


if __name__ == "__main__":
    main()
