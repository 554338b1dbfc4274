"""Which voice should bible-tts use? Each synthesizer voice judged on the same verses.

Any voice of ``encdec.data.speech.CATALOGUE`` (the bible-speech voices, standard and wide)
can be judged; the default is the flite voices.

    python benchmarks/tts_voices.py [--voices flite-rms flite-awb ...] [--limit 40]
                                    [--split dev] [--workers 2]

Every voice reads the same first ``--limit`` verses of the split (the bible-tts plan: the
bible-en-es chapters, the recipe's settings, rate and pitch 1) and the independent recognizer
(pocketsphinx, ``encdec.audio.judge``) transcribes them: a voice's WER is the ceiling a TTS
model trained on it can be judged at, so bible-tts takes the voice with the lowest. Prints one
row per voice (WER, CER, seconds of speech, seconds per word) with the best marked. The dev
split is the default so that the choice is not made on the test verses it is reported on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from encdec.audio.io import read_audio  # noqa: E402
from encdec.audio.judge import SAMPLE_RATE, Judge, judge_text  # noqa: E402
from encdec.data.speech import CATALOGUE, VOICES, synthesize  # noqa: E402
from encdec.data.tts import plan_bible_tts  # noqa: E402
from encdec.metrics import asr_scores  # noqa: E402


def _speak(job):
    utt, path = job
    return synthesize(utt, Path(path))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--voices", nargs="+",
                    default=[v.name for v in VOICES if v.engine == "flite"])
    ap.add_argument("--split", default="dev", choices=["dev", "test"])
    ap.add_argument("--limit", type=int, default=40, help="verses per voice")
    ap.add_argument("--workers", type=int, default=2, help="synthesis processes")
    args = ap.parse_args()
    known = set(CATALOGUE)
    for name in args.voices:
        if name not in known:
            sys.exit(f"unknown voice {name!r}; choose from {', '.join(sorted(known))}")

    judge = Judge()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.voices:
            plan = [u for u in plan_bible_tts(name, train_hours=0.0, log=lambda *a: None)
                    if u.split == args.split][: args.limit]
            jobs = [(u, str(Path(tmp) / name / f"{u.id}.flac")) for u in plan]
            start = time.perf_counter()
            with ProcessPoolExecutor(args.workers) as pool:
                seconds = list(pool.map(_speak, jobs))
            synth_s = time.perf_counter() - start
            waves = [read_audio(path, SAMPLE_RATE) for _, path in jobs]
            hyps = [judge_text(t) for t in judge.transcribe(waves)]
            refs = [[judge_text(u.text)] for u in plan]
            s = asr_scores(hyps, refs)
            rows.append((name, s["wer"], s["cer"], sum(seconds), sum(seconds) / s["words"]))
            print(f"{name}: WER {s['wer']:.1f} %, CER {s['cer']:.1f} % "
                  f"({len(plan)} verses, {sum(seconds):.0f} s, synthesized in {synth_s:.0f} s)",
                  flush=True)
    best = min(rows, key=lambda r: r[1])[0]
    print(f"\n{args.limit} {args.split} verses per voice, judged by {judge.name}")
    print("| voice | judge WER % | CER % | seconds | s per word |")
    print("|---|---:|---:|---:|---:|")
    for name, wer, cer, secs, per_word in rows:
        mark = "**" if name == best else ""
        print(f"| {mark}{name}{mark} | {wer:.1f} | {cer:.1f} | {secs:.0f} | {per_word:.3f} |")
    print(f"most intelligible: {best}")


if __name__ == "__main__":
    main()
