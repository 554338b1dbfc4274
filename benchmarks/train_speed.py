"""Training throughput: encdec vs a plain torch.nn.Transformer loop on the same batches.

    python benchmarks/train_speed.py [--config configs/g2p-small.yaml] [--repeats 3]
                                     [--warmup 20] [--steps 100] [--device cpu|cuda]

Throughput = target tokens (EOS included) per second over steps 20-120 (``--warmup`` steps
untimed, then ``--steps`` timed), on the same token-based batches. Runs alternate
(encdec, reference, reference, encdec, ...) and the medians of ``--repeats`` and their ratio
are printed. On CUDA both train with bf16 autocast (encdec's ``train.precision=auto``).

The reference (``benchmarks/reference.py``) is put on equal footing with encdec's trainer:
- the same optimizer: encdec's ``make_optimizer`` (fused AdamW, weight decay on >= 2-D
  parameters only, the config's lr/betas/eps) and the same lr schedule (``lr_at``), gradient
  clipping, loss / target tokens, and a ``float(loss)`` read per step;
- the same model: size, dropout placement (embeddings and sublayer outputs; attention and
  activation dropout per the config), tied/shared embeddings, and, for pre-LN configs,
  encdec's initial weights; the parameter counts and the first batch's loss with dropout off
  are printed for both;
- the same masks, and logits only at real target positions.

Differences that remain, and why:
- nn.MultiheadAttention turns a boolean key-padding mask into an additive float mask, per head;
  encdec passes the boolean mask to SDPA. It is the reference's own way, not a handicap.
- The reference's loss is ``F.cross_entropy(label_smoothing=)`` (one fused kernel); encdec's
  ``label_smoothed_nll`` also returns the plain NLL for its logs. Same loss value.
- encdec's step reads the NLL too and computes the scheduled-sampling probability (0 here):
  bookkeeping the trainer needs, counted against encdec.
- Post-LN configs: nn.Transformer still ends each stack with a LayerNorm (2 x 2 d extra
  parameters) and cannot take encdec's weights, so both start from their own initialization.
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
from reference import ReferenceTransformer, count_parameters  # noqa: E402

from encdec.config import Config  # noqa: E402
from encdec.data.dataset import BinarizedSplit, collate, token_batches  # noqa: E402
from encdec.data.prepare import load_meta  # noqa: E402
from encdec.losses import sequence_loss  # noqa: E402
from encdec.models import build_model  # noqa: E402
from encdec.train import Trainer, lr_at, make_optimizer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, batches, warmup: int, steps: int, device: torch.device) -> float:
    for i, b in enumerate(batches[:warmup]):
        step(i, b)
    _sync(device)
    tokens, start = 0, time.perf_counter()
    for i, b in enumerate(batches[warmup:warmup + steps], warmup):
        tokens += step(i, b)
    _sync(device)
    return tokens / (time.perf_counter() - start)


def run_ours(cfg: Config, batches, warmup: int, steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.run_dir = tmp
        trainer = Trainer(cfg, log=lambda *a: None, progress=False)
        trainer.model.train()
        return _timed(lambda i, b: trainer._train_step([b])[2], batches, warmup, steps,
                      trainer.device)


def build_reference(cfg: Config, meta: dict, device: torch.device) -> ReferenceTransformer:
    """The reference, starting from the weights encdec's trainer starts from (pre-LN)."""
    ref = ReferenceTransformer(cfg.model, meta["src_vocab_size"], meta["tgt_vocab_size"])
    if cfg.model.norm == "pre":
        torch.manual_seed(cfg.train.seed)  # as Trainer does before build_model
        ref.load_encdec(build_model(cfg.model, meta["src_vocab_size"], meta["tgt_vocab_size"]))
    return ref.to(device)


def run_reference(cfg: Config, meta: dict, batches, warmup: int, steps: int,
                  device: torch.device) -> float:
    t = cfg.train
    model = build_reference(cfg, meta, device).train()
    opt = make_optimizer(model, t)
    torch.manual_seed(t.seed * 1000)  # the trainer's dropout seed
    amp = device.type == "cuda"

    def step(i, b):
        for group in opt.param_groups:
            group["lr"] = lr_at(i, t)
        b = b.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model.loss(b, t.label_smoothing)
        (loss / b.num_tgt_tokens).backward()
        if t.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        return b.num_tgt_tokens

    return _timed(step, batches, warmup, steps, device)


@torch.no_grad()
def check_same_model(cfg: Config, meta: dict, batch, device: torch.device) -> None:
    """Parameter counts, and the first batch's summed loss with dropout off, of both."""
    torch.manual_seed(cfg.train.seed)
    ours = build_model(cfg.model, meta["src_vocab_size"], meta["tgt_vocab_size"]).to(device).eval()
    ref = build_reference(cfg, meta, device).eval()
    line = f"parameters: encdec {count_parameters(ours):,}, reference {count_parameters(ref):,}"
    if cfg.model.norm == "pre":
        b = batch.to(device)
        ls = cfg.train.label_smoothing
        line += (f"; first batch loss, dropout off: encdec {float(sequence_loss(ours, b, ls)[0]):.2f}, "
                 f"reference {float(ref.loss(b, ls)):.2f}")
    print(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/g2p-small.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps before the timed ones")
    ap.add_argument("--steps", type=int, default=100, help="timed steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Config.load(args.config, [f"train.num_threads={args.threads}", f"train.device={args.device}"])
    device = torch.device(args.device)
    split = BinarizedSplit(cfg.data.dir, "train")
    meta = load_meta(cfg.data.dir)
    order = token_batches(split.src_lens, split.tgt_lens, cfg.train.max_tokens, seed=1, epoch=0)
    batches = [collate(split, idx) for idx in order[: args.warmup + args.steps]]
    mean_tokens = statistics.mean(b.num_tgt_tokens for b in batches)
    print(f"{args.config}: {cfg.model.enc_layers}+{cfg.model.dec_layers} x {cfg.model.d_model}, "
          f"ffn {cfg.model.ffn_dim}, {mean_tokens:.0f} target tokens/batch, steps "
          f"{args.warmup}-{args.warmup + args.steps}, "
          f"{args.device if args.device != 'cpu' else f'{args.threads} threads'}, "
          f"torch {torch.__version__}")
    check_same_model(cfg, meta, batches[0], device)
    ours, ref = [], []
    for r in range(args.repeats):
        pair = [("encdec", lambda: run_ours(cfg, batches, args.warmup, args.steps), ours),
                ("reference", lambda: run_reference(cfg, meta, batches, args.warmup, args.steps,
                                                    device), ref)]
        for _, fn, out in pair if r % 2 == 0 else pair[::-1]:  # ABBA: no side always first
            out.append(fn())
        print(f"  run {r + 1}: encdec {ours[-1]:,.0f} tok/s   torch.nn.Transformer {ref[-1]:,.0f} tok/s"
              f"   ratio {ours[-1] / ref[-1]:.2f}", flush=True)
    mo, mr = statistics.median(ours), statistics.median(ref)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"median of {args.repeats}: encdec {mo:,.0f} tok/s, torch.nn.Transformer {mr:,.0f} tok/s, "
          f"ratio {mo / mr:.2f}x (peak RSS of this process {peak:,.0f} MB)")


if __name__ == "__main__":
    main()
