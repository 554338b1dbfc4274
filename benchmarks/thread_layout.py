"""Training throughput by how a CPU's cores are used: intra-op threads in one process, or
data-parallel processes (DDP over gloo) with fewer threads each, at the same tokens per update.

    python benchmarks/thread_layout.py [--config configs/g2p-small.yaml] [--cores 2]
                                       [--steps 80] [--warmup 20] [--repeats 3]
                                       [--layout NAME:PROCESSES:THREADS ...] [--set KEY=VALUE ...]

Each layout is a real ``encdec train`` run (``torchrun`` for more than one process) of
``--steps`` updates with no validation in between; a layout with P processes gives each
``train.max_tokens / P``, so an update holds the same number of tokens in every layout. Its
throughput is the target tokens per second of the logged windows after ``--warmup`` steps
(``tokens_per_s`` in the run's metrics.jsonl, every process's tokens counted), its memory the
peak resident set of rank 0. Layouts alternate, each repeat starting with a different one, and
the table gives the median of ``--repeats`` and its ratio to the first layout.

The default layouts on two cores: ``1x2`` (one process, two threads: how ``encdec train`` runs)
``2x1`` (two processes of one thread each) and ``1x1`` (one thread: what a second core adds).
PyTorch's inter-op thread pool is not a choice here: its documentation gives it to TorchScript's
parallel work (the JIT interpreter), so the layouts are intra-op threads against processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_layout(text: str) -> tuple[str, int, int]:
    try:
        name, processes, threads = text.split(":")
        return name, int(processes), int(threads)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layout {text!r}: expected NAME:PROCESSES:THREADS, "
                                         "e.g. 2x1:2:1") from None


def command(config: str, layout: tuple[str, int, int], run_dir: Path, args) -> list[str]:
    import yaml

    _, processes, threads = layout
    max_tokens = yaml.safe_load(Path(config).read_text())["train"]["max_tokens"]
    for item in args.set:
        if item.startswith("train.max_tokens="):
            max_tokens = int(item.split("=", 1)[1])
    overrides = [f"train.run_dir={run_dir}", f"train.max_steps={args.steps}",
                 "train.max_minutes=0", f"train.valid_every={args.steps}",
                 "train.valid_max_inputs=8", f"train.log_every={args.log_every}",
                 f"train.num_threads={threads}", *args.set,
                 f"train.max_tokens={max_tokens // processes}"]
    if processes == 1:
        return [sys.executable, "-m", "encdec.cli", "train", config, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", "-m", "encdec.cli", "train", config, *overrides]


def measure(config: str, layout, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        env = dict(os.environ, OMP_NUM_THREADS=str(layout[2]))
        proc = subprocess.run(command(config, layout, run_dir, args), check=False, cwd=ROOT,
                              env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            sys.exit(f"layout {layout[0]} failed:\n{proc.stdout[-3000:]}")
        records = [json.loads(line) for line in
                   (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "tokens_per_s" in r and r["step"] > args.warmup]
    if not windows:
        sys.exit(f"layout {layout[0]}: no logged window after step {args.warmup}")
    return {"tokens_per_s": statistics.mean(r["tokens_per_s"] for r in windows),
            "peak_rss_mb": max(r["max_rss_mb"] for r in windows)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/g2p-small.yaml")
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--warmup", type=int, default=20,
                    help="steps left out of the figure (a multiple of --log-every)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layout", type=parse_layout, action="append", default=[],
                    help="NAME:PROCESSES:THREADS (default 1x2, 2x1, 1x1)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every layout")
    args = ap.parse_args(argv)
    if args.warmup % args.log_every or args.warmup >= args.steps:
        ap.error("--warmup must be a multiple of --log-every and below --steps")
    layouts = args.layout or [("1x2", 1, 2), ("2x1", 2, 1), ("1x1", 1, 1)]
    results = {name: [] for name, _, _ in layouts}
    for r in range(args.repeats):
        for k in range(len(layouts)):
            layout = layouts[(r + k) % len(layouts)]
            result = measure(args.config, layout, args)
            results[layout[0]].append(result)
            print(f"repeat {r + 1}: {layout[0]} {result['tokens_per_s']:,.0f} target tok/s, "
                  f"peak RSS {result['peak_rss_mb']:,.0f} MB", flush=True)
    base = statistics.median(x["tokens_per_s"] for x in results[layouts[0][0]])
    print(f"\n{args.config}, steps {args.warmup + 1}-{args.steps}, medians of {args.repeats}")
    print("| layout | processes x threads | target tok/s | ratio | runs | peak RSS (rank 0) |")
    print("|---|---|---:|---:|---|---:|")
    for name, processes, threads in layouts:
        rates = [x["tokens_per_s"] for x in results[name]]
        rss = statistics.median(x["peak_rss_mb"] for x in results[name])
        med = statistics.median(rates)
        print(f"| {name} | {processes} x {threads} | {med:,.0f} | {med / base:.2f}x | "
              f"{', '.join(f'{x:,.0f}' for x in rates)} | {rss:,.0f} MB |")


if __name__ == "__main__":
    main()
