"""Mel generation speed at batch 1: non-autoregressive (fastspeech) against autoregressive
(transformer_tts or tacotron2) text-to-speech, on 1 and 2 CPU threads.

    python benchmarks/tts_speed.py --nat RUN --at RUN [--split test] [--limit 20]
                                   [--threads 1 2] [--repeats 3] [--frames nat|recording]

Each verse of the split's first ``--limit`` is spoken alone (batch 1) by both models, in
alternating order. The autoregressive model is made to generate exactly as many frames as the
fastspeech model did for the verse (its stop head is switched off; rounded up to whole
decoder steps of ``reduction`` frames), so both make the same audio length and the ratio is
per frame, independent of how well either is trained.
``--frames recording`` makes both generate the recording's frame count instead: the fastspeech
model is given durations that spread the recording's frames evenly over the verse's tokens, so
a fastspeech run of a few steps, whose duration predictor has learned nothing yet, times the
same work. ``transformer_tts`` decodes on its key/value caches (``reduction`` frames per
step), ``tacotron2`` on its LSTM states. Times cover the model (text ids in, post-net mel
frames out); the vocoder (Griffin-Lim, 32 iterations) is timed apart on the same frames.
The autoregressive model's post-net (a stack of convolutions over every frame) is also timed
alone on each verse's frames: the AT model's time over it bounds what any NAT with that
post-net could gain, however cheap its decoder. The fastspeech run may have that same post-net
or none (``model.tts_postnet_layers=0``, as in FastSpeech itself).
Real-time factor = seconds of compute / seconds of speech. A first verse is spoken untimed by
each. Medians over ``--repeats`` passes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from encdec.audio.vocoder import vocode  # noqa: E402
from encdec.data.utterances import read_manifest  # noqa: E402
from encdec.speak import Speaker  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nat", required=True, help="a fastspeech run")
    ap.add_argument("--at", required=True,
                    help="an autoregressive run (transformer_tts or tacotron2) on the same data")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--frames", choices=["nat", "recording"], default="nat",
                    help="whose frame count both models make: the fastspeech model's predicted "
                         "durations, or the recording's length spread evenly over the tokens")
    args = ap.parse_args()
    nat, at = Speaker.from_run(args.nat), Speaker.from_run(args.at)
    if nat.autoregressive or not at.autoregressive:
        sys.exit("--nat takes a fastspeech run and --at an autoregressive one")
    entries = read_manifest(nat.cfg.data.dir, args.split)[: args.limit]
    opts = nat.assets.audio_front.opts
    ids = [torch.tensor([nat.input_ids(e["text"])]) for e in entries]
    given = [None] * len(ids)  # durations (1, N) per verse with --frames recording
    if args.frames == "recording":
        for i, (x, e) in enumerate(zip(ids, entries)):
            n = x.size(1)
            total = max(round(e["duration"] * 1000 / opts.frame_shift_ms), n)
            given[i] = (torch.arange(1, n + 1) * total // n
                        - torch.arange(n) * total // n)[None]  # sums to total

    def nat_mels(x, durations):
        return nat.model.synthesize(x, durations=durations)

    @torch.no_grad()
    def at_mels(x, frames):
        return at.model.synthesize(x, max_frames=frames, stop_threshold=2.0)  # never stops

    print(f"{len(entries)} {args.split} verses, batch 1, frames from {args.frames}; {args.nat} "
          f"({nat.cfg.model.arch}) vs {args.at} ({at.cfg.model.arch}, reduction "
          f"{at.cfg.model.tts_reduction}); torch {torch.__version__}")

    def shape(model):
        return [] if model.postnet is None else [tuple(w.shape) for w in model.postnet.parameters()]

    if not shape(at.model) or shape(nat.model) not in ([], shape(at.model)):
        sys.exit("the autoregressive run needs a post-net, and the fastspeech run the same one or "
                 "none: the post-net column bounds the AT by the AT's own")
    print(f"post-net: fastspeech {'the same as the AT' if shape(nat.model) else 'none'}, "
          f"{at.cfg.model.arch} {at.cfg.model.tts_postnet_layers} layers")

    @torch.no_grad()
    def postnet(n):
        frames = torch.zeros(1, n, at.model.n_mels)
        return at.model._postnet(frames, torch.ones(1, n, dtype=torch.bool))

    print(f"| threads | speech s | fastspeech s (RTF) | {at.cfg.model.arch} s (RTF) | AT / NAT | "
          "AT's post-net alone s | AT / post-net | vocoder s (RTF) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        frames = [int(nat_mels(x, d).frame_lengths[0]) for x, d in zip(ids, given)]  # warm-up
        at_mels(ids[0], frames[0])
        speech_s = sum(frames) * opts.frame_shift_ms / 1000
        runs = {"nat": [], "at": [], "post": [], "voc": []}
        for _ in range(args.repeats):
            took = {"nat": 0.0, "at": 0.0, "post": 0.0, "voc": 0.0}
            for k, (x, d, n) in enumerate(zip(ids, given, frames)):
                order = ("nat", "at") if k % 2 == 0 else ("at", "nat")
                for name in order:
                    start = time.perf_counter()
                    out = nat_mels(x, d) if name == "nat" else at_mels(x, n)
                    took[name] += time.perf_counter() - start
                    made = int(out.frame_lengths[0])  # AT: whole decoder steps of r frames
                    assert n <= made < n + at.cfg.model.tts_reduction, (name, made, n)
                mel = out.mels.float() * nat.assets.audio_front.stats.std + \
                    nat.assets.audio_front.stats.mean
                start = time.perf_counter()
                postnet(n)
                took["post"] += time.perf_counter() - start
                start = time.perf_counter()
                vocode(mel, opts)
                took["voc"] += time.perf_counter() - start
            for name in runs:
                runs[name].append(took[name])
        t = {name: statistics.median(v) for name, v in runs.items()}
        print(f"| {threads} | {speech_s:.1f} | {t['nat']:.2f} ({t['nat'] / speech_s:.4f}) | "
              f"{t['at']:.2f} ({t['at'] / speech_s:.4f}) | {t['at'] / t['nat']:.1f}x | "
              f"{t['post']:.2f} | {t['at'] / t['post']:.1f}x | "
              f"{t['voc']:.2f} ({t['voc'] / speech_s:.4f}) |", flush=True)


if __name__ == "__main__":
    main()
