"""Training throughput: encdec vs a plain torch.nn.Transformer loop (and fairseq) on the same batches.

    python benchmarks/train_speed.py [--config configs/g2p-small.yaml] [--repeats 3]
                                     [--warmup 20] [--steps 100] [--device cpu|cuda]
                                     [--peer fairseq] [--allocator default|all]
                                     [--variant NAME:KEY=VALUE[,KEY=VALUE...] ...]
                                     [--no-reference]

Throughput = target tokens (EOS included) per second over steps 20-120 (``--warmup`` steps
untimed, then ``--steps`` timed), on the same token-based batches (encdec's batching of the
config's train split, seed 1, epoch 0). Every run is a fresh process, so each system's peak
RSS is its own; runs alternate, each repeat starting with a different system, and the medians
of ``--repeats`` are printed in one table. On CUDA encdec and the reference train with bf16
autocast (encdec's ``train.precision=auto``).

``--peer fairseq`` adds fairseq 0.12 (``benchmarks/peers/``: installed once into its own
virtual environment with encdec's torch; the data directory converted with fairseq-preprocess).
fairseq runs its own model, criterion, optimizer (its Adam), schedule and ``Trainer.train_step``
on fairseq's collation of the same pairs in the same batches; the source sentences lose the
EOS fairseq-preprocess appends, so both read the same tokens. What stays fairseq's own: it
computes logits and the loss at padded positions too, and left-pads the source.

encdec's trainer keeps freed buffers in glibc's heap on the CPU (``train.retain_freed_memory``,
``encdec/host.py``); the reference and fairseq run with the C library's defaults, as their users
would. ``--allocator all`` gives them the same setting (the reference calls the same function;
fairseq gets the equivalent ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment),
so the table shows what remains without it.

``--variant packed:train.packed_linear=true`` adds encdec with those config overrides as one
more system (its own row, timed in the same rotation), so an option is measured against
encdec's defaults and the peers in one table; ``--no-reference`` leaves the reference out
(an option against encdec's defaults alone).

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
- nn.MultiheadAttention turns a boolean key-padding mask into an additive float mask, per head,
  and calls its own attention; encdec passes the boolean mask to SDPA, or on the CPU, for up to
  ``EXPLICIT_MAX_KEYS`` keys, computes the attention itself (faster there:
  ``benchmarks/attention_kernels.py``). Each is the system's own way, not a handicap.
- The reference's loss is ``F.cross_entropy(label_smoothing=)``, differentiated by autograd;
  encdec's ``label_smoothed_nll`` writes its gradient in one pass and also returns the plain
  NLL for its logs. Same loss value and gradient.
- encdec's step reads the NLL too and computes the scheduled-sampling probability (0 here):
  bookkeeping the trainer needs, counted against encdec.
- Post-LN configs: nn.Transformer still ends each stack with a LayerNorm (2 x 2 d extra
  parameters) and cannot take encdec's weights, so both start from their own initialization.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
import fairseq_peer  # noqa: E402
from reference import ReferenceTransformer, count_parameters  # noqa: E402

from encdec.config import Config  # noqa: E402
from encdec.data.dataset import BinarizedSplit, collate, token_batches  # noqa: E402
from encdec.data.prepare import load_meta  # noqa: E402
from encdec.data.vocab import PAD  # noqa: E402
from encdec.host import allocator_environment, retain_freed_memory  # noqa: E402
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


def run_ours(cfg: Config, batches, warmup: int, steps: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.run_dir = tmp
        trainer = Trainer(cfg, log=lambda *a: None, progress=False)
        trainer.model.train()
        rate = _timed(lambda i, b: trainer._train_step([b])[2], batches, warmup, steps,
                      trainer.device)
        return rate, count_parameters(trainer.model)


def build_reference(cfg: Config, meta: dict, device: torch.device) -> ReferenceTransformer:
    """The reference, starting from the weights encdec's trainer starts from (pre-LN)."""
    ref = ReferenceTransformer(cfg.model, meta["src_vocab_size"], meta["tgt_vocab_size"])
    if cfg.model.norm == "pre":
        torch.manual_seed(cfg.train.seed)  # as Trainer does before build_model
        ref.load_encdec(build_model(cfg.model, meta["src_vocab_size"], meta["tgt_vocab_size"]))
    return ref.to(device)


def run_reference(cfg: Config, meta: dict, batches, warmup: int, steps: int,
                  device: torch.device) -> tuple[float, int]:
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

    return _timed(step, batches, warmup, steps, device), count_parameters(model)


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


def _padding(batches) -> tuple[float, float]:
    """Mean fraction of padding in the source and in the target (decoder output) tensors."""
    src = statistics.mean(float(b.src_tokens.eq(PAD).float().mean()) for b in batches)
    tgt = statistics.mean(float(b.tgt_out.eq(PAD).float().mean()) for b in batches)
    return src, tgt


def measure_one(args) -> None:
    """One timed run of one system in this process; prints a JSON line (for main)."""
    torch.set_num_threads(args.threads)
    cfg = _config(args)
    split = BinarizedSplit(cfg.data.dir, "train")
    saved = np.load(args.batches)
    order = np.split(saved["indices"], np.cumsum(saved["sizes"])[:-1])
    batches = [collate(split, idx) for idx in order[: args.warmup + args.steps]]
    device = torch.device(args.device)
    if args.one == "reference" and args.allocator == "all" and device.type == "cpu":
        if not retain_freed_memory():
            sys.exit("--allocator all: could not set glibc's thresholds")
    if args.one == "encdec":
        rate, params = run_ours(cfg, batches, args.warmup, args.steps)
    else:
        rate, params = run_reference(cfg, load_meta(cfg.data.dir), batches, args.warmup,
                                     args.steps, device)
    timed = batches[args.warmup:]
    src_pad, tgt_pad = _padding(timed)
    print(json.dumps({"tokens_per_s": rate, "parameters": params,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "tgt_tokens_per_batch": statistics.mean(b.num_tgt_tokens for b in timed),
                      "src_padding": src_pad, "tgt_padding": tgt_pad}))


def first_batches(cfg: Config, split: BinarizedSplit, count: int) -> list:
    """The first ``count`` token batches (index arrays) of encdec's batching: seed 1, epoch 0."""
    return token_batches(split.src_lens, split.tgt_lens, cfg.train.max_tokens, seed=1,
                         epoch=0)[:count]


def save_batches(order: list, path: Path) -> None:
    """Batches as one file every timed process reads (``--batches``)."""
    np.savez(path, indices=np.concatenate(order), sizes=np.array([len(o) for o in order]))


def _config(args) -> Config:
    return Config.load(args.config, [f"train.num_threads={args.threads}",
                                     f"train.device={args.device}"] + list(args.set))


def _variant(text: str) -> tuple[str, list[str]]:
    """'NAME:KEY=VALUE,KEY=VALUE' -> (NAME, [KEY=VALUE, ...])."""
    name, sep, overrides = text.partition(":")
    pairs = [o for o in overrides.split(",") if o]
    if not sep or not name or not pairs or any("=" not in o for o in pairs):
        sys.exit(f"--variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE...]")
    return name, pairs


def _run(cmd: list[str], env: dict | None = None) -> dict:
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{out.stderr}\nfailed ({out.returncode}): {' '.join(cmd)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/g2p-small.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps before the timed ones")
    ap.add_argument("--steps", type=int, default=100, help="timed steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--peer", choices=["fairseq"], help="also time this toolkit on the same batches")
    ap.add_argument("--allocator", choices=["default", "all"], default="default",
                    help="all: the reference and the peer get encdec's allocator setting too")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="also time encdec with these config overrides, as system 'encdec NAME'")
    ap.add_argument("--no-reference", action="store_true",
                    help="leave the torch.nn.Transformer reference out of the table")
    ap.add_argument("--one", choices=["encdec", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--batches", help=argparse.SUPPRESS)
    ap.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return measure_one(args)
    variants = [_variant(v) for v in args.variant]
    if args.peer and args.device != "cpu":
        sys.exit("--peer fairseq runs on the CPU only")
    torch.set_num_threads(args.threads)
    cfg = _config(args)
    device = torch.device(args.device)
    split = BinarizedSplit(cfg.data.dir, "train")
    meta = load_meta(cfg.data.dir)
    order = first_batches(cfg, split, args.warmup + args.steps)
    print(f"{args.config}: {cfg.model.enc_layers}+{cfg.model.dec_layers} x {cfg.model.d_model}, "
          f"ffn {cfg.model.ffn_dim}, max_tokens {cfg.train.max_tokens}, steps "
          f"{args.warmup}-{args.warmup + args.steps} timed, "
          f"{args.device if args.device != 'cpu' else f'{args.threads} threads'}, "
          f"torch {torch.__version__}"
          + (", encdec's allocator setting for all" if args.allocator == "all" else ""))
    check_same_model(cfg, meta, collate(split, order[0]), device)
    tmp = tempfile.TemporaryDirectory()
    batches_file = Path(tmp.name) / "batches.npz"
    save_batches(order, batches_file)
    common = ["--config", args.config, "--warmup", str(args.warmup), "--steps", str(args.steps),
              "--threads", str(args.threads), "--device", args.device, "--batches", str(batches_file),
              "--allocator", args.allocator]
    here = str(Path(__file__).resolve())
    systems = {"encdec": [sys.executable, here, "--one", "encdec"] + common,
               "torch.nn.Transformer": [sys.executable, here, "--one", "reference"] + common}
    if args.no_reference:
        del systems["torch.nn.Transformer"]
    for name, overrides in variants:
        systems[f"encdec {name}"] = ([sys.executable, here, "--one", "encdec"] + common
                                     + [f"--set={o}" for o in overrides])
    if args.peer == "fairseq":
        python = fairseq_peer.install()
        data = fairseq_peer.convert(cfg.data.dir, python)
        lens = Path(tmp.name) / "src_lens.npy"
        np.save(lens, split.src_lens)
        systems["fairseq 0.12"] = [python, str(fairseq_peer.DRIVER), "--data", str(data),
                                   "--batches", str(batches_file), "--src-lens", str(lens),
                                   "--warmup", str(args.warmup), "--steps", str(args.steps),
                                   "--threads", str(args.threads), "--"] + fairseq_peer.train_args(cfg)
    envs = {name: None for name in systems}
    if args.peer == "fairseq" and args.allocator == "all":
        envs["fairseq 0.12"] = {**os.environ, **allocator_environment()}
    names = list(systems)
    results = {n: [] for n in names}
    for r in range(args.repeats):
        # each system starts each repeat in a different position: none is always first
        for name in names[r % len(names):] + names[: r % len(names)]:
            results[name].append(_run(systems[name], envs[name]))
        print(f"  run {r + 1}: " + "   ".join(f"{n} {results[n][-1]['tokens_per_s']:,.0f}"
                                            for n in names) + " tok/s", flush=True)
    base = statistics.median(x["tokens_per_s"] for x in results["encdec"])
    print(f"\nmedian of {args.repeats} (target tokens/s over the same {args.steps} batches):")
    print("| system | tokens/s | encdec / system | parameters | target tokens/batch | "
          "padding src / tgt | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for n in names:
        rate = statistics.median(x["tokens_per_s"] for x in results[n])
        last = results[n][-1]
        print(f"| {n} | {rate:,.0f} | {base / rate:.2f}x | {last['parameters']:,} | "
              f"{last['tgt_tokens_per_batch']:,.0f} | {last['src_padding']:.1%} / "
              f"{last['tgt_padding']:.1%} | "
              f"{statistics.median(x['peak_rss_mb'] for x in results[n]):,.0f} MB |")
    tmp.cleanup()


if __name__ == "__main__":
    main()
