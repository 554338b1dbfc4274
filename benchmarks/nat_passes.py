"""What each Mask-Predict pass does, and what sharing the encoder keys/values and scoring only
the predicted positions saves.

    python benchmarks/nat_passes.py --nat RUN [--split dev] [--iterations 4] [--length-beam 1]
                                    [--no-early-exit] [--limit N]
    python benchmarks/nat_passes.py --nat RUN --ab [--split test] [--iterations 4]
                                    [--length-beam 3] [--repeats 3]

Default: decodes the split as ``encdec evaluate`` does on a NAT run (batch 64, the given
passes and length beam, early exit unless ``--no-early-exit``) and prints, for each pass, how
many outputs (candidate rows: inputs x length beam) it decoded and how many of them it changed
(any token different from what the pass was given), as a share of all outputs. With early exit
an output leaves after a pass that changed none of its tokens, so the share changed in pass 2 is
the share the later passes still run on.

``--ab``: inputs/s of Mask-Predict as it is (cross-attention keys/values of the encoder output
projected once per input and shared by all passes and candidate lengths; output scores only at
the positions a pass predicts) against an emulation of the implementation before commit d5cd9c8
(keys/values projected in every pass for every candidate row; log-softmax over the vocabulary
at every position), every pass run (``early_exit`` off on both sides, as before that commit).
The emulation wraps the model's ``project_memory``, ``decode_parallel`` and ``logits``; it also
pays the current log-softmax over the predicted positions, so it overstates the earlier cost a
little. Untimed warm-up pass of each first, then alternating rounds; medians and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encdec.data.dataset import read_eval  # noqa: E402
from encdec.data.vocab import BOS, EOS, PAD  # noqa: E402
from encdec.models.base import EncoderOut  # noqa: E402
from encdec.translate import Translator  # noqa: E402


@contextlib.contextmanager
def patched(model, **methods):
    """Instance attributes shadowing the model's methods, removed on exit."""
    for name, fn in methods.items():
        setattr(model, name, fn)
    try:
        yield
    finally:
        for name in methods:
            delattr(model, name)


def pass_counts(model):
    """Wrappers that record, per Mask-Predict pass, [rows decoded, rows changed]."""
    counts: list[list[int]] = []
    seen = {"pass": 0}
    encode, decode_parallel, logits = model.encode, model.decode_parallel, model.logits

    def encode_(src_tokens):  # once per mask_predict call (batch)
        seen["pass"] = 0
        return encode(src_tokens)

    def decode_parallel_(tokens, observed, encoder_out, **kw):
        seen["tokens"], seen["update"] = tokens, tokens.ne(PAD) & ~observed
        return decode_parallel(tokens, observed, encoder_out, **kw)

    def logits_(hidden):
        out = logits(hidden)
        # What mask_predict does with the logits (decoding/nat.py), to see which rows change.
        log_probs = torch.log_softmax(out.float(), dim=-1)
        log_probs[:, [PAD, BOS, EOS]] = float("-inf")
        tokens, update = seen["tokens"], seen["update"]
        changed = (tokens.masked_scatter(update, log_probs.argmax(-1)) != tokens).any(1)
        if seen["pass"] == len(counts):
            counts.append([0, 0])
        counts[seen["pass"]][0] += tokens.size(0)
        counts[seen["pass"]][1] += int(changed.sum())
        seen["pass"] += 1
        return out

    return counts, dict(encode=encode_, decode_parallel=decode_parallel_, logits=logits_)


def earlier_implementation(model):
    """Wrappers emulating Mask-Predict before d5cd9c8: no shared memory, scores everywhere."""
    decode_parallel, logits = model.decode_parallel, model.logits
    seen: dict = {"expanded": {}}

    def decode_parallel_(tokens, observed, encoder_out, memory=None, **kw):
        N, G = tokens.size(0), encoder_out.memory.size(0)
        if G != N:  # one row per candidate, built once per batch as before
            key = id(encoder_out.memory)
            if key not in seen["expanded"]:
                rows = torch.arange(G, device=tokens.device).repeat_interleave(N // G)
                seen["expanded"] = {key: EncoderOut(encoder_out.memory.index_select(0, rows),
                                                    encoder_out.memory_mask.index_select(0, rows))}
            encoder_out = seen["expanded"][key]
        hidden, weights = decode_parallel(tokens, observed, encoder_out, memory=None, **kw)
        seen["hidden"], seen["update"] = hidden, tokens.ne(PAD) & ~observed
        return hidden, weights

    def logits_(_):
        log_probs = torch.log_softmax(logits(seen["hidden"]).float(), dim=-1)  # (N, T, V)
        log_probs[..., [PAD, BOS, EOS]] = float("-inf")
        log_probs.max(dim=-1)
        return log_probs[seen["update"]]

    return dict(project_memory=lambda encoder_out: None, decode_parallel=decode_parallel_,
                logits=logits_)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nat", required=True, help="non-autoregressive run")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--length-beam", type=int, default=None, help="default: 1; with --ab 3")
    ap.add_argument("--no-early-exit", action="store_true")
    ap.add_argument("--ab", action="store_true", help="time shared memory + predicted-only scores "
                                                      "against the earlier implementation")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="only the first N inputs of the split")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tr = Translator.from_run(args.nat)
    texts = [e["src"] for e in read_eval(tr.cfg.data.dir, args.split)]
    texts = texts[:args.limit] if args.limit else texts
    lb = args.length_beam or (3 if args.ab else 1)
    settings = dict(method="nat", iterations=args.iterations, length_beam=lb,
                    batch_size=args.batch_size, early_exit=not (args.no_early_exit or args.ab))
    print(f"{args.nat}: {len(texts):,} {args.split} inputs, {args.iterations} passes, length beam "
          f"{lb}, early exit {'on' if settings['early_exit'] else 'off'}, batch {args.batch_size}, "
          f"{args.threads} threads")
    if not args.ab:
        counts, wrappers = pass_counts(tr.model)
        with patched(tr.model, **wrappers):
            tr.translate(texts, **settings)
        total = counts[0][0]
        for i, (rows, changed) in enumerate(counts, 1):
            print(f"  pass {i}: decoded {rows:,} of {total:,} outputs ({rows / total:.1%}), "
                  f"changed {changed:,} ({changed / total:.1%})")
        return

    variants = {"shared K/V, scores where predicted": {},
                "earlier: K/V every pass, scores everywhere": earlier_implementation(tr.model)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs = {}
    for r in range(-1, args.repeats):  # round -1: warm-up, untimed
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            with patched(tr.model, **variants[name]):
                start = time.perf_counter()
                outputs[name] = tr.translate(texts, **settings)
                if r >= 0:
                    times[name].append(time.perf_counter() - start)
    a, b = (outputs[name] for name in variants)
    print(f"  outputs identical for {sum(x == y for x, y in zip(a, b)):,}/{len(texts):,}")
    rates = {name: len(texts) / statistics.median(ts) for name, ts in times.items()}
    for name, rate in rates.items():
        print(f"  {name:<44} {rate:8,.1f} inputs/s (median of {args.repeats}: "
              + ", ".join(f"{len(texts) / t:,.1f}" for t in times[name]) + ")")
    now, before = rates.values()
    print(f"  ratio {now / before:.2f}x")


if __name__ == "__main__":
    main()
