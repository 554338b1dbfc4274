"""Speed control of a FastSpeech run: output duration and intelligibility against length_scale.

    python benchmarks/tts_length_scale.py RUN [--scales 0.6 0.8 1.0 1.2 1.4 1.6]
                                          [--split test] [--limit 20] [--out DIR]

Speaks the split's first ``--limit`` verses at each scale (``Speaker.speak``, Griffin-Lim),
and has the independent recognizer (pocketsphinx, ``encdec.audio.judge``) transcribe them.
Prints one row per scale: seconds of speech, the ratio to scale 1.0 (total, and the range over
utterances), judge WER and CER; writes the table and a plot (seconds and WER against the
scale) to ``--out`` (default RUN/eval/length-scale).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from encdec.audio.judge import Judge, judge_text  # noqa: E402
from encdec.data.utterances import read_manifest  # noqa: E402
from encdec.metrics import asr_scores  # noqa: E402
from encdec.speak import Speaker  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.6, 0.8, 1.0, 1.2, 1.4, 1.6])
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="where the table and plot go (default RUN/eval/length-scale)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    speaker = Speaker.from_run(args.run)
    if speaker.autoregressive:
        sys.exit(f"{args.run} is autoregressive: length_scale needs a fastspeech run")
    entries = read_manifest(speaker.cfg.data.dir, args.split)[: args.limit or None]
    texts = [e["text"] for e in entries]
    refs = [[judge_text(t)] for t in texts]
    judge = Judge()
    scales = sorted(set(args.scales) | {1.0})
    rows = {}
    for scale in scales:
        speeches = []
        for i in range(0, len(texts), args.batch_size):
            speeches += speaker.speak(texts[i:i + args.batch_size], length_scale=scale)
        heard = [judge_text(h) for h in judge.transcribe([s.audio for s in speeches],
                                                          speaker.sample_rate)]
        scores = asr_scores(heard, refs)
        rows[scale] = {"seconds": [s.seconds for s in speeches], "wer": scores["wer"],
                       "cer": scores["cer"]}
        print(f"  scale {scale:g}: {sum(rows[scale]['seconds']):.1f} s, WER {scores['wer']:.1f}",
              file=sys.stderr, flush=True)
    base = np.array(rows[1.0]["seconds"])
    lines = [f"{len(texts)} {args.split} verses of {speaker.cfg.data.dir}, {args.run} "
             f"({speaker.checkpoint_dir.name}), judge {judge.name}",
             "| length_scale | seconds | / scale 1.0 | per utterance | judge WER | judge CER |",
             "|---:|---:|---:|---|---:|---:|"]
    for scale in scales:
        secs = np.array(rows[scale]["seconds"])
        each = secs / base
        rows[scale]["ratio"] = float(secs.sum() / base.sum())
        lines.append(f"| {scale:g} | {secs.sum():.1f} | {rows[scale]['ratio']:.3f} | "
                     f"{each.min():.3f}-{each.max():.3f} | {rows[scale]['wer']:.1f} | "
                     f"{rows[scale]['cer']:.1f} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out or Path(args.run) / "eval" / "length-scale")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=1),
                                      encoding="utf-8")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(6, 3.6))
    left.plot(scales, [sum(rows[s]["seconds"]) for s in scales], "o-", color="#2456c5",
              label="seconds of speech")
    left.plot(scales, [base.sum() * s for s in scales], ":", color="#2456c5", alpha=0.6,
              label="scale x seconds at 1.0")
    left.set_xlabel("length_scale")
    left.set_ylabel("seconds of speech", color="#2456c5")
    left.legend(loc="upper left", fontsize=8)
    right = left.twinx()
    right.plot(scales, [rows[s]["wer"] for s in scales], "s-", color="#b3261e")
    right.set_ylabel("judge WER %", color="#b3261e")
    right.set_ylim(0, max(100, max(rows[s]["wer"] for s in scales) + 5))
    left.set_title(f"{Path(args.run).name}: speed control, {len(texts)} {args.split} verses")
    fig.tight_layout()
    fig.savefig(out / "plot.png", dpi=120)
    print(f"written: {out}/results.md, {out}/plot.png", file=sys.stderr)


if __name__ == "__main__":
    main()
