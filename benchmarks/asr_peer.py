"""Speech recognition side by side with a peer: encdec against PocketSphinx 5.x on the same audio.

    python benchmarks/asr_peer.py RUN [--data data/bible-speech] [--splits test real] [--limit N]
                                  [--beam 10] [--ctc-weight 0.3] [--threads 1] [--batch 64]
                                  [--repeats 1] [--out FILE.json]
    python benchmarks/asr_peer.py --peer-only [--data DIR] ...   # PocketSphinx alone, no RUN

The peer is PyPI ``pocketsphinx`` 5.x with its default configuration: the bundled US-English
acoustic model, trigram LM (en-us.lm.bin) and dictionary, so it runs offline. Rows:
PocketSphinx; encdec CTC greedy (``method="ctc"``); encdec joint CTC/attention beam
(``method="beam"``, ``--beam``, ``--ctc-weight``). Columns: WER and CER (%) for each group of
the manifests read (``seen`` and ``unseen`` voices in test, ``real`` recordings in real), the
real-time factor (decode seconds / audio seconds, all utterances) and the speed relative to
PocketSphinx (its RTF over the row's). WER = word edits / reference words over the group
(corpus level); CER = character edits (spaces included) / reference characters.

Scoring: references and both systems' outputs pass through ``encdec.audio.judge.judge_text``
(lowercase words, apostrophes kept, abbreviations spelled out), so both are scored the same way.

Timing: the audio is loaded first (FLAC -> float32 at 16 kHz); each system is set up once
(PocketSphinx decoder created, encdec run loaded), decodes the first utterance once untimed
(warm-up), then decodes every utterance, timed (decoding only). PocketSphinx is single-threaded
and takes one utterance at a time, as 16-bit PCM bytes (the conversion is timed with it);
encdec gets the whole list in one ``Transcriber.transcribe`` call and batches it (``--batch``,
longest first) with ``torch.set_num_threads(--threads)``. With ``--repeats R`` the timed pass
runs R times (the rows in turn, reversed every other round) and the median is reported; the
transcripts are deterministic. BENCHMARKS.md asks R >= 3 for a published speed; the default is
1 because PocketSphinx runs near real time on one core here (the test split is ~85 min of audio).

``--limit N`` keeps the first N utterances of each group of each split, so a short run still
covers every group. ``--out`` writes the figures, the command line and every transcript as JSON.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encdec.audio.io import read_audio  # noqa: E402
from encdec.audio.judge import SAMPLE_RATE, Judge, judge_text as scoring_text  # noqa: E402
from encdec.metrics import edit_distance  # noqa: E402

GROUP_ORDER = ("seen", "unseen", "real")


def wer_counts(hyps: list[str], refs: list[str]) -> tuple[int, int]:
    """(word edits, reference words), summed over the corpus."""
    return (sum(edit_distance(h.split(), r.split()) for h, r in zip(hyps, refs)),
            sum(len(r.split()) for r in refs))


def cer_counts(hyps: list[str], refs: list[str]) -> tuple[int, int]:
    """(character edits, reference characters), over the strings with single spaces."""
    return (sum(edit_distance(h, r) for h, r in zip(hyps, refs)), sum(len(r) for r in refs))


def corpus_wer(hyps: list[str], refs: list[str]) -> float:
    edits, words = wer_counts(hyps, refs)
    return 100.0 * edits / max(words, 1)


def corpus_cer(hyps: list[str], refs: list[str]) -> float:
    edits, chars = cer_counts(hyps, refs)
    return 100.0 * edits / max(chars, 1)


def read_manifests(data_dir: Path, splits: list[str], limit: int) -> list[dict]:
    """The utterances of ``splits`` (manifest order), the first ``limit`` of each group if set."""
    entries = []
    for split in splits:
        path = data_dir / f"{split}.manifest.jsonl"
        if not path.exists():
            sys.exit(f"asr_peer.py: {path}: no such manifest; prepare the data with "
                     f"`encdec prepare bible-speech --out {data_dir}` or pass --data/--splits")
        kept: dict[str, int] = {}
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                entry = json.loads(line)
                missing = {"id", "audio", "text", "group"} - entry.keys()
                if missing:
                    sys.exit(f"asr_peer.py: {path}:{line_no}: missing {sorted(missing)}")
                group = entry["group"]
                if limit and kept.get(group, 0) >= limit:
                    continue
                kept[group] = kept.get(group, 0) + 1
                entries.append({**entry, "split": split})
    if not entries:
        sys.exit(f"asr_peer.py: no utterances in {data_dir} for splits {splits}")
    return entries


def pocketsphinx_system():
    """(name, decode(waves) -> texts): the default en-us decoder (``encdec.audio.judge``)."""
    judge = Judge()
    return judge.name, judge.transcribe


def encdec_systems(run: str, args) -> dict:
    """name -> decode(waves) -> texts, for CTC greedy and joint CTC/attention beam."""
    # imported here: --peer-only needs neither a trained run nor this module
    from encdec.transcribe import Transcriber

    tr = Transcriber.from_run(run)

    def system(**decode):
        return lambda waves: tr.transcribe([(w, SAMPLE_RATE) for w in waves],
                                           batch_size=args.batch, **decode)

    return {
        "encdec CTC greedy": system(method="ctc"),
        f"encdec joint CTC/attention beam {args.beam} (ctc {args.ctc_weight:g})": system(
            method="beam", beam_size=args.beam, ctc_weight=args.ctc_weight),
    }


def run_timed(systems: dict, waves: list[np.ndarray], repeats: int) -> tuple[dict, dict]:
    """Each system's transcripts and its timed passes (seconds), after one untimed warm-up."""
    for decode in systems.values():
        decode(waves[:1])  # warm-up: first utterance, untimed
    texts, times = {}, {name: [] for name in systems}
    for r in range(repeats):
        for name in (list(systems) if r % 2 == 0 else list(systems)[::-1]):
            start = time.perf_counter()
            out = systems[name](waves)
            times[name].append(time.perf_counter() - start)
            texts.setdefault(name, out)
    return texts, times


def ordered_groups(entries: list[dict]) -> list[str]:
    """The voice groups of ``entries``: seen, unseen, real, then any others by name."""
    return sorted({e["group"] for e in entries},
                  key=lambda g: (GROUP_ORDER.index(g) if g in GROUP_ORDER else 99, g))


def score_groups(entries: list[dict], hyps: list[str]) -> dict:
    """group -> WER, CER and the counts behind them."""
    out = {}
    for group in ordered_groups(entries):
        idx = [i for i, e in enumerate(entries) if e["group"] == group]
        h = [scoring_text(hyps[i]) for i in idx]
        r = [scoring_text(entries[i]["text"]) for i in idx]
        (word_edits, words), (char_edits, chars) = wer_counts(h, r), cer_counts(h, r)
        out[group] = {"wer": corpus_wer(h, r), "cer": corpus_cer(h, r), "utterances": len(idx),
                      "word_edits": word_edits, "ref_words": words,
                      "char_edits": char_edits, "ref_chars": chars}
    return out


def print_table(results: dict, peer: str) -> None:
    groups = list(next(iter(results.values()))["groups"])
    width = max(len(name) for name in results)
    head = f"{'system':<{width}}" + "".join(f" | {g + ' WER':>11} {g + ' CER':>11}" for g in groups)
    print(head + f" | {'RTF':>6} | {'speed vs peer':>13}")
    print("-" * (len(head) + 26))
    for name, res in results.items():
        line = f"{name:<{width}}" + "".join(
            f" | {res['groups'][g]['wer']:10.1f}% {res['groups'][g]['cer']:10.1f}%" for g in groups)
        print(line + f" | {res['rtf']:6.3f} | {results[peer]['rtf'] / res['rtf']:12.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", nargs="?", help="trained speech run directory (not with --peer-only)")
    ap.add_argument("--data", default="data/bible-speech", help="prepared bible-speech directory")
    ap.add_argument("--splits", nargs="+", default=["test", "real"])
    ap.add_argument("--limit", type=int, default=0, help="first N utterances of each group")
    ap.add_argument("--beam", type=int, default=10)
    ap.add_argument("--ctc-weight", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for encdec")
    ap.add_argument("--batch", type=int, default=64, help="encdec inputs per decoding batch")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes; the median is reported")
    ap.add_argument("--peer-only", action="store_true", help="run PocketSphinx alone")
    ap.add_argument("--out", help="write the figures and transcripts to this JSON file")
    args = ap.parse_args()
    if bool(args.run) == args.peer_only:
        ap.error("name a trained RUN, or pass --peer-only (not both)")
    torch.set_num_threads(args.threads)
    data_dir = Path(args.data)
    entries = read_manifests(data_dir, args.splits, args.limit)
    waves = [read_audio(data_dir / e["audio"], SAMPLE_RATE).numpy() for e in entries]
    audio_s = sum(len(w) for w in waves) / SAMPLE_RATE

    peer, peer_decode = pocketsphinx_system()
    systems = {peer: peer_decode}
    if not args.peer_only:
        systems.update(encdec_systems(args.run, args))
    texts, times = run_timed(systems, waves, args.repeats)

    results = {}
    for name in systems:
        decode_s = statistics.median(times[name])
        results[name] = {"groups": score_groups(entries, texts[name]), "decode_s": decode_s,
                         "decode_s_all": times[name], "rtf": decode_s / audio_s}
    counts = ", ".join(f"{g} {v['utterances']} ({v['ref_words']} words)"
                       for g, v in results[peer]["groups"].items())
    print(f"{data_dir} {'+'.join(args.splits)}: {len(entries)} utterances, {audio_s:.1f} s of "
          f"audio; {counts}. RTF = decode s / audio s (median of {args.repeats}); pocketsphinx "
          f"single-threaded, encdec {args.threads} torch thread(s), batch {args.batch}; "
          f"torch {torch.__version__}")
    print_table(results, peer)
    if args.out:
        record = {
            "command": shlex.join([sys.executable, *sys.argv]), "args": vars(args),
            "data": str(data_dir), "audio_s": audio_s, "torch": torch.__version__,
            "pocketsphinx": importlib.metadata.version("pocketsphinx"), "systems": results,
            "utterances": [{"id": e["id"], "split": e["split"], "group": e["group"],
                            "ref": e["text"], **{name: texts[name][i] for name in systems}}
                           for i, e in enumerate(entries)],
        }
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
