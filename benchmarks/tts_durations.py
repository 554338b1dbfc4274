"""Learned phone durations scored against the synthesizer's own: mean absolute error in ms.

    python benchmarks/tts_durations.py RUN [RUN ...] [--split test] [--limit 100] [--checkpoint step-0000500]

The bible-tts audio comes from flite, which can print the phone segmentation of what it
speaks (``flite -psdur``, with the same voice and settings the recipe synthesized with, so the
times are those of the recording). The durations are scored, never trained on. Per run:

- fastspeech trained jointly: ``aligner`` - its alignment module and MAS on the recording's
  frames (the durations it trained its decoder and duration predictor on);
- fastspeech: ``predicted`` - its duration predictor from the text alone (what it speaks with);
- transformer_tts, tacotron2: ``attention`` - MAS over its teacher-forced cross-attention on the
  recording with the pre-net's dropout off (the durations ``train.durations_from`` teaches a
  fastspeech model; ``--prenet-dropout`` reads them with it on, as the model trained);
- ``uniform``: every unit of an utterance the same length (a floor any aligner must beat).

Units: encdec's phonemes (CMUdict, no stress) against flite's (its CMU lexicon and letter-to-
sound rules, lower case); a punctuation token against flite's pause; a word boundary token's
frames go to the phone before it, flite's leading pause to the first phone (encdec has no token
for it). The two sequences are aligned by edit distance; units at the same place (equal or
substituted) are scored, the rest (a different pronunciation's extra phones) counted apart.
The last column is the share of all frames the durations give to word-boundary tokens, which
have no sound of their own in flite's segmentation (scored with the phone before them).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from encdec import checkpoint  # noqa: E402
from encdec.config import Config  # noqa: E402
from encdec.data.assets import load_assets  # noqa: E402
from encdec.data.speech import VOICES  # noqa: E402
from encdec.data.tts import WORD_BOUNDARY, TTSSplit, collate_tts  # noqa: E402
from encdec.data.vocab import PAD  # noqa: E402
from encdec.models import model_for_data  # noqa: E402
from encdec.models.tts import durations_from_attention  # noqa: E402
from encdec.nn.alignment import durations as hard_durations  # noqa: E402
from encdec.nn.alignment import monotonic_alignment_search  # noqa: E402

PAUSE = "pau"


def flite_phones(text: str, voice_name: str) -> list[tuple[str, float]]:
    """(phone, milliseconds) as flite speaks ``text`` with the recipe's settings."""
    voice = next(v for v in VOICES if v.name == voice_name)
    if voice.engine != "flite":
        sys.exit(f"{voice_name}: phone times need a flite voice")
    out = subprocess.run(["flite", "-voice", voice.voice, "-psdur", "--setf",
                          "duration_stretch=1.000", "--setf",
                          f"int_f0_target_mean={voice.pitch:.1f}", "-t", text, "-o", "none"],
                         capture_output=True, text=True, check=True).stdout
    phones, last = [], 0.0
    for item in out.split():
        name, end = item.rsplit(":", 1)
        phones.append((name, (float(end) - last) * 1000))
        last = float(end)
    return phones


def our_units(tokens: list[str], frames: list[int], frame_ms: float) -> list[tuple[str, float]]:
    units: list[list] = []
    carry = 0.0  # boundary frames before any phone
    for tok, n in zip(tokens, frames):
        ms = n * frame_ms
        if tok == WORD_BOUNDARY:
            if units:
                units[-1][1] += ms
            else:
                carry += ms
            continue
        units.append([PAUSE if not tok[0].isalpha() else tok.lower(), ms + carry])
        carry = 0.0
    return [(u, ms) for u, ms in units]


def flite_units(phones: list[tuple[str, float]]) -> list[tuple[str, float]]:
    units = [list(p) for p in phones]
    while len(units) > 1 and units[0][0] == PAUSE:  # leading silence: the first phone's
        units[1][1] += units[0][1]
        units.pop(0)
    return [(u, ms) for u, ms in units]


def align(a: list[str], b: list[str]) -> list[tuple[int, int]]:
    """Index pairs (i, j) placed together (match or substitution) by edit distance."""
    n, m = len(a), len(b)
    cost = np.zeros((n + 1, m + 1), dtype=np.int32)
    cost[:, 0] = np.arange(n + 1)
    cost[0, :] = np.arange(m + 1)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost[i, j] = min(cost[i - 1, j] + 1, cost[i, j - 1] + 1,
                             cost[i - 1, j - 1] + (a[i - 1] != b[j - 1]))
    pairs, i, j = [], n, m
    while i > 0 and j > 0:
        if cost[i, j] == cost[i - 1, j - 1] + (a[i - 1] != b[j - 1]):
            pairs.append((i - 1, j - 1))
            i, j = i - 1, j - 1
        elif cost[i, j] == cost[i - 1, j] + 1:
            i -= 1
        else:
            j -= 1
    return pairs[::-1]


class Score:
    def __init__(self):
        self.errors: list[float] = []
        self.pause_errors: list[float] = []
        self.same = self.placed = self.units = 0
        self.frames = self.boundary_frames = 0

    def add(self, ours: list[tuple[str, float]], ref: list[tuple[str, float]],
            tokens: list[str], frames: list[int]) -> None:
        self.frames += sum(frames)
        self.boundary_frames += sum(n for tok, n in zip(tokens, frames) if tok == WORD_BOUNDARY)
        pairs = align([u for u, _ in ours], [u for u, _ in ref])
        self.units += len(ref)
        self.placed += len(pairs)
        for i, j in pairs:
            err = abs(ours[i][1] - ref[j][1])
            (self.pause_errors if ref[j][0] == PAUSE else self.errors).append(err)
            self.same += ours[i][0] == ref[j][0]

    def row(self, name: str) -> str:
        both = self.errors + self.pause_errors

        def mean(xs):
            return f"{statistics.mean(xs):.1f}" if xs else "-"
        return (f"| {name} | {mean(both)} | {statistics.median(both):.1f} | "
                f"{mean(self.errors)} | {mean(self.pause_errors)} | "
                f"{self.placed / self.units:.1%} | {self.same / max(self.placed, 1):.1%} | "
                f"{self.boundary_frames / max(self.frames, 1):.1%} |")


def load(run: Path, which: str = "best"):
    cfg = Config.load(run / "config.yaml")
    assets = load_assets(run / "data")
    model = model_for_data(cfg.model, assets.meta)
    checkpoint.load_weights(model, checkpoint.resolve(run, which))
    return cfg, assets, model.eval()


@torch.no_grad()
def run_durations(run: Path, split: TTSSplit, indices: list[int], front,
                  which: str = "best", prenet_dropout: bool = False) -> dict[str, list]:
    """{method: [durations (frames) per utterance]} for one run's checkpoint ``which``."""
    cfg, assets, model = load(run, which)
    out: dict[str, list] = {}
    for i in indices:
        batch = collate_tts(split, [i], front)
        n = batch.tokens.ne(PAD).sum(dim=1)
        if cfg.model.arch == "fastspeech":
            if not cfg.train.durations_from:
                log_align = model.align(batch.tokens, batch.mels, batch.mel_lengths)
                hard = monotonic_alignment_search(log_align, n, batch.mel_lengths)
                out.setdefault("aligner", []).append(hard_durations(hard)[0].tolist())
            out.setdefault("predicted", []).append(model.synthesize(batch.tokens).durations[0]
                                                   .tolist())
        else:
            _, parts = model.loss(batch.tokens, batch.mels, batch.mel_lengths,
                                  prenet_dropout=prenet_dropout)
            out.setdefault("attention", []).append(
                durations_from_attention(parts["attention"], n, batch.mel_lengths)[0].tolist())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="TTS runs on the same bible-tts data")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=100, help="utterances (0: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", default="best",
                    help="every run's checkpoint: best, last, or a step-NNNNNNN name")
    ap.add_argument("--prenet-dropout", action="store_true",
                    help="transformer_tts: read the attention with the pre-net's dropout on, as "
                         "in training (default off, as train.durations_from reads it)")
    ap.add_argument("--seed", type=int, default=0, help="for --prenet-dropout")
    ap.add_argument("--reread", action="store_true",
                    help="transformer_tts: read the durations a second time (the next seed) and "
                         "print how many tokens' durations changed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    runs = [Path(r) for r in args.runs]
    cfg = Config.load(runs[0] / "config.yaml")
    assets = load_assets(runs[0] / "data")
    voice = assets.meta.get("voice", "")
    split = TTSSplit(cfg.data.dir, args.split)
    indices = list(range(len(split)))[: args.limit or None]
    frame_ms = assets.audio_front.opts.frame_shift_ms
    tokens = [assets.src_vocab.decode(split.src(i).tolist()) for i in indices]
    refs = [flite_units(flite_phones(split.entries[i]["text"], voice)) for i in indices]
    scores: dict[str, Score] = {}
    uniform = Score()
    for toks, ref, i in zip(tokens, refs, indices):
        frames = int(split.frames[i])
        n = len(toks)
        even = [frames // n + (k < frames % n) for k in range(n)]
        uniform.add(our_units(toks, even, frame_ms), ref, toks, even)
    rereads = []
    for run in runs:
        read = run_durations(run, split, indices, assets.audio_front, args.checkpoint,
                             args.prenet_dropout)
        for method, per_utt in read.items():
            score = scores.setdefault(f"{run.name}: {method}", Score())
            for toks, frames, ref in zip(tokens, per_utt, refs):
                score.add(our_units(toks, frames, frame_ms), ref, toks, frames)
        if args.reread and "attention" in read:
            torch.manual_seed(args.seed + 1)
            again = run_durations(run, split, indices, assets.audio_front, args.checkpoint,
                                  args.prenet_dropout)["attention"]
            diffs = [abs(a - b) for first, second in zip(read["attention"], again)
                     for a, b in zip(first, second)]
            rereads.append(f"{run.name}: read again, {sum(d > 0 for d in diffs) / len(diffs):.1%}"
                           f" of {len(diffs):,} tokens change duration, by "
                           f"{statistics.fmean(diffs) * frame_ms:.1f} ms on average")
    print(f"{len(indices)} {args.split} utterances of {cfg.data.dir} ({voice}); flite's phone "
          f"times as the reference; {sum(len(r) for r in refs):,} flite units; checkpoint "
          f"{args.checkpoint}" + (f"; pre-net dropout on, seed {args.seed}"
                                  if args.prenet_dropout else ""))
    print("| durations | MAE ms | median ms | MAE phones | MAE pauses | units placed | "
          "same label | frames on word boundaries |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, score in scores.items():
        print(score.row(name))
    print(uniform.row("uniform (every unit the same length)"))
    for line in rereads:
        print(line)


if __name__ == "__main__":
    main()
