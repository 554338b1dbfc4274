"""Training throughput: encdec vs a plain torch.nn.Transformer loop on the same batches.

    python benchmarks/train_speed.py [--config configs/g2p-small.yaml] [--repeats 3]
                                     [--device cpu|cuda]

Throughput = target tokens (EOS included) per second over steps 20-120, after start-up.
Both models see the same token-based batches; the reference uses Adam, as in BENCHMARKS.md.
Runs alternate (ours, reference, ours, ...) and the medians and their ratio are printed.
On CUDA both train with bf16 autocast (encdec's ``train.precision=auto``).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import ReferenceTransformer  # noqa: E402

from encdec.config import Config  # noqa: E402
from encdec.data.dataset import BinarizedSplit, collate, token_batches  # noqa: E402
from encdec.train import Trainer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_ours(cfg: Config, batches, warmup: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.run_dir = tmp
        trainer = Trainer(cfg, log=lambda *a: None)
        trainer.model.train()
        for b in batches[:warmup]:
            trainer._train_step([b])
        _sync(trainer.device)
        tokens, start = 0, time.perf_counter()
        for b in batches[warmup:warmup + steps]:
            tokens += trainer._train_step([b])[2]
        _sync(trainer.device)
        return tokens / (time.perf_counter() - start)


def run_reference(cfg: Config, meta: dict, batches, warmup: int, steps: int,
                  device: torch.device) -> float:
    torch.manual_seed(cfg.train.seed)
    model = ReferenceTransformer(cfg.model, meta["src_vocab_size"], meta["tgt_vocab_size"])
    model = model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, betas=(0.9, 0.98))
    amp = device.type == "cuda"

    def step(b):
        b = b.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model.loss(b, cfg.train.label_smoothing)
        (loss / b.num_tgt_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for b in batches[:warmup]:
        step(b)
    _sync(device)
    tokens, start = 0, time.perf_counter()
    for b in batches[warmup:warmup + steps]:
        step(b)
        tokens += b.num_tgt_tokens
    _sync(device)
    return tokens / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/g2p-small.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Config.load(args.config, [f"train.num_threads={args.threads}", f"train.device={args.device}"])
    device = torch.device(args.device)
    split = BinarizedSplit(cfg.data.dir, "train")
    from encdec.data.prepare import load_meta

    meta = load_meta(cfg.data.dir)
    order = token_batches(split.src_lens, split.tgt_lens, cfg.train.max_tokens, seed=1, epoch=0)
    batches = [collate(split, idx) for idx in order[: args.warmup + args.steps]]
    mean_tokens = statistics.mean(b.num_tgt_tokens for b in batches)
    print(f"{cfg.model.enc_layers}+{cfg.model.dec_layers} x {cfg.model.d_model}, ffn {cfg.model.ffn_dim}, "
          f"{mean_tokens:.0f} target tokens/batch, steps {args.warmup}-{args.warmup + args.steps}, "
          f"{args.device if args.device != 'cpu' else f'{args.threads} threads'}, "
          f"torch {torch.__version__}")
    ours, ref = [], []
    for r in range(args.repeats):
        ours.append(run_ours(cfg, batches, args.warmup, args.steps))
        ref.append(run_reference(cfg, meta, batches, args.warmup, args.steps, device))
        print(f"  run {r + 1}: encdec {ours[-1]:,.0f} tok/s   torch.nn.Transformer {ref[-1]:,.0f} tok/s"
              f"   ratio {ours[-1] / ref[-1]:.2f}", flush=True)
    mo, mr = statistics.median(ours), statistics.median(ref)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"median: encdec {mo:,.0f} tok/s, torch.nn.Transformer {mr:,.0f} tok/s, "
          f"ratio {mo / mr:.2f}x (peak RSS of this process {peak:,.0f} MB)")


if __name__ == "__main__":
    main()
