"""Does encdec's cheaper CPU dropout train as well as PyTorch's? Dev curves at equal steps.

    python benchmarks/dropout_quality.py [--config configs/g2p-small.yaml] [--steps 600]
                                         [--valid-every 150] [--seeds 1 2] [--threads 2]

Trains the config for ``--steps`` steps once per seed with encdec's dropout
(``encdec/nn/dropout.py``: four 16-bit uniforms per 64-bit draw) and once with PyTorch's
``F.dropout`` (one Bernoulli draw per element) in its place, everything else equal (the same
seed, batches, initial weights), each in a fresh process, one after the other. Prints the dev
loss (and the dev WER of the first ``--valid-inputs`` words, greedy) at every validation, the
difference between the two dropouts per seed, and for scale the difference between seeds with
the same dropout. Run directories go to a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train_one(args) -> None:
    import torch

    import encdec.nn.dropout as ours
    from encdec.config import Config
    from encdec.train import train

    if args.one == "pytorch":  # every encdec dropout through F.dropout instead
        ours._cheap = lambda x, p: False
    torch.set_num_threads(args.threads)
    cfg = Config.load(args.config, [
        f"train.run_dir={args.run_dir}", f"train.seed={args.seed}", f"train.max_steps={args.steps}",
        "train.max_minutes=0", f"train.valid_every={args.valid_every}",
        f"train.valid_max_inputs={args.valid_inputs}", f"train.num_threads={args.threads}",
        "train.device=cpu"])
    train(cfg, log=lambda *a: None, progress=False)


def curve(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    return {r["step"]: r for r in rows if "valid_loss" in r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/g2p-small.yaml")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--valid-every", type=int, default=150)
    ap.add_argument("--valid-inputs", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", choices=["encdec", "pytorch"], help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return train_one(args)
    curves = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for arm in ("encdec", "pytorch"):
                run_dir = Path(tmp) / f"{arm}-{seed}"
                subprocess.run([sys.executable, __file__, "--one", arm, "--seed", str(seed),
                                "--run-dir", str(run_dir), "--config", args.config,
                                "--steps", str(args.steps), "--valid-every", str(args.valid_every),
                                "--valid-inputs", str(args.valid_inputs),
                                "--threads", str(args.threads)], check=True)
                curves[arm, seed] = curve(run_dir)
                print(f"trained {arm} dropout, seed {seed}", flush=True)
    steps = sorted(curves["encdec", args.seeds[0]])
    metric = next((k for k in curves["encdec", args.seeds[0]][steps[0]]
                   if k.startswith("valid_") and k not in ("valid_loss", "valid_nll", "valid_ppl",
                                                           "valid_n", "valid_exact_match")), None)
    print(f"\n{args.config}, {args.steps} steps, dev loss"
          + (f" / {metric[6:].upper()} on {args.valid_inputs} dev inputs (greedy)" if metric else ""))
    head = " | ".join(f"{arm} s{seed}" for seed in args.seeds for arm in ("encdec", "pytorch"))
    print(f"| step | {head} | encdec - pytorch (per seed) |")
    print("|---:|" + "---:|" * (2 * len(args.seeds) + 1))
    for step in steps:
        cells, diffs = [], []
        for seed in args.seeds:
            a, b = curves["encdec", seed][step], curves["pytorch", seed][step]
            for r in (a, b):
                cells.append(f"{r['valid_loss']:.3f}" + (f" / {r[metric]:.1f}" if metric else ""))
            diffs.append(f"{a['valid_loss'] - b['valid_loss']:+.3f}")
        print(f"| {step} | " + " | ".join(cells) + f" | {', '.join(diffs)} |")
    last = steps[-1]
    arm_gap = [abs(curves["encdec", s][last]["valid_loss"] - curves["pytorch", s][last]["valid_loss"])
               for s in args.seeds]
    line = f"at step {last}: |encdec - pytorch| dev loss {statistics.mean(arm_gap):.3f} (mean over seeds)"
    if len(args.seeds) > 1:
        seed_gap = [abs(curves[arm, args.seeds[0]][last]["valid_loss"]
                        - curves[arm, args.seeds[1]][last]["valid_loss"]) for arm in ("encdec", "pytorch")]
        line += f"; |seed {args.seeds[0]} - seed {args.seeds[1]}| {statistics.mean(seed_gap):.3f} (mean over dropouts)"
    print(line)


if __name__ == "__main__":
    main()
