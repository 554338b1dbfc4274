"""Speech translation, end to end against the cascade, on the same test verses and voices.

    python benchmarks/st_compare.py --asr runs/asr-small --mt runs/bible-en-es-30 \\
        --st runs/st-small [--st LABEL=RUN[@CHECKPOINT] ...] [--ablation LABEL=RUN[@CHECKPOINT] ...]
        [--data DIR (default: the first --st run's data.dir)]
        [--split test] [--limit N] [--threads 2] [--batch 32] [--speed-n 128] [--repeats 3]
        [--out FILE.json]

Rows, each scored on the same utterances of ``--split`` (each test verse is read once by a seen
and once by an unseen voice):

* ``MT, KJV text``: the MT run (``--mt``, a bible-en-es run) on the verse's printed English, as
  its training data has it (cased, punctuated): the upper bound.
* ``MT, spoken transcript``: the MT run on the transcript the recognizer is trained to write
  (lowercase words, no punctuation): what a perfect recognizer would hand the cascade.
* ``cascade``: ``encdec.pipeline.Pipeline`` of the ASR run and the MT run, each with its own
  decoding settings (``decode`` of its config), only the best transcript translated.
* each ``--st`` and ``--ablation`` run (``LABEL=RUN@CHECKPOINT``; the label defaults to ``end to
  end`` for the first, the checkpoint to ``best``): audio straight to Spanish with its own
  decoding settings. Ablations are scored but not timed.

Quality: sacreBLEU BLEU and chrF (``encdec.metrics.text_scores``, signatures in the JSON) per
voice group against the Reina-Valera verse of the manifest, the same references for every row.

Training minutes: the wall minutes of the runs that make up a system (``elapsed_s`` at the
last line of each run's ``metrics.jsonl``, all trained on this machine's 2 cores): the ASR run
plus the MT run for the cascade; the ST run plus the run its encoder was copied from
(``train.init_from``, ``train.init_decoder_from``) for end to end; to the checkpoint's step
when one is named.

Speed: verses per second over the first ``--speed-n`` utterances of the split, audio already in
memory, ``--threads`` torch threads, ``--batch`` inputs per batch (every stage), detokenized
text out; one untimed warm-up batch per system, then ``--repeats`` timed passes with the
systems in turn (order reversed every other round), the median reported, and each system's
speed as a ratio to the cascade's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encdec.audio.io import read_audio  # noqa: E402
from encdec.metrics import text_scores  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from asr_peer import ordered_groups  # noqa: E402


def default_data(st_items: list[str]) -> str:
    """The first end-to-end run's corpus (its data.dir), so its references and audio are scored."""
    if st_items:
        _, run, _ = parse_run(st_items[0], "end to end")
        if (run / "config.yaml").exists():
            data_dir = (run_config(run).get("data") or {}).get("dir")
            if data_dir:
                return str(data_dir)
    return "data/bible-speech-es"


def read_manifest(data_dir: Path, split: str, limit: int) -> list[dict]:
    path = data_dir / f"{split}.manifest.jsonl"
    if not path.exists():
        sys.exit(f"st_compare.py: {path}: no such manifest; run `encdec prepare bible-speech-es` "
                 "or pass --data")
    entries, kept = [], {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            entry = json.loads(line)
            missing = {"id", "audio", "text", "transcript", "group", "ref"} - entry.keys()
            if missing:
                sys.exit(f"st_compare.py: {path}:{line_no}: missing {sorted(missing)} (a "
                         "bible-speech-es manifest has them)")
            if limit and kept.get(entry["group"], 0) >= limit:
                continue
            kept[entry["group"]] = kept.get(entry["group"], 0) + 1
            entries.append(entry)
    return entries


def kjv_text(refs: list[str]) -> dict[str, str]:
    """Verse key ("Acts.2.18") -> the printed KJV verse, from the same aligned Bible the speech
    corpus was synthesized from."""
    from encdec.data.recipes import read_sword_bible

    by_key = {".".join(map(str, ref)): text for ref, text in read_sword_bible("kjv").items()}
    missing = sorted(set(refs) - by_key.keys())
    if missing:
        sys.exit(f"st_compare.py: {len(missing)} verse keys not in the KJV module, e.g. {missing[0]}")
    return by_key


def run_minutes(run: Path, checkpoint: str = "best") -> float:
    """Training wall minutes of ``run`` (to the step of ``checkpoint`` when it names one)."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    if checkpoint.startswith("step-"):
        step = int(checkpoint.split("-")[1])
        lines = [x for x in lines if x.get("step", 0) <= step]
    return max(x.get("elapsed_s", 0.0) for x in lines) / 60


def parse_run(item: str, default_label: str) -> tuple[str, Path, str]:
    """"[LABEL=]RUN[@CHECKPOINT]" -> (label, run, checkpoint)."""
    label, _, rest = item.rpartition("=")
    run, _, checkpoint = rest.partition("@")
    return label or default_label, Path(run), checkpoint or "best"


def run_config(run: Path) -> dict:
    """The configuration a run was trained with (RUN/config.yaml), as a plain dict."""
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}


def init_runs(run: Path) -> list[Path]:
    """The runs whose weights ``run`` started from (train.init_from, train.init_decoder_from)."""
    train = run_config(run).get("train") or {}
    return [Path(train[k]) for k in ("init_from", "init_decoder_from") if train.get(k)]


def score_groups(entries: list[dict], hyps: list[str]) -> dict:
    out = {}
    for group in ordered_groups(entries):
        idx = [i for i, e in enumerate(entries) if e["group"] == group]
        out[group] = text_scores([hyps[i] for i in idx], [[entries[i]["text"]] for i in idx])
    out["all"] = text_scores(hyps, [[e["text"]] for e in entries])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--asr", required=True, help="the speech recognition run (cascade stage 1)")
    ap.add_argument("--mt", required=True, help="the bible-en-es translation run (stage 2)")
    ap.add_argument("--st", action="append", default=[], metavar="[LABEL=]RUN[@CHECKPOINT]",
                    help="an end-to-end speech translation run (checkpoint best unless named, "
                         "e.g. @step-0000500); repeat for more")
    ap.add_argument("--ablation", action="append", default=[], metavar="[LABEL=]RUN[@CHECKPOINT]",
                    help="like --st, scored but not timed (same architecture as an --st run)")
    ap.add_argument("--data", help="the speech translation corpus (default: the first --st "
                                   "run's data.dir, else data/bible-speech-es)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=0, help="first N utterances of each group")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--speed-n", type=int, default=128, help="utterances in the timed passes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", help="write figures, settings and every output as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from encdec.pipeline import Pipeline
    from encdec.transcribe import Transcriber

    data_dir = Path(args.data or default_data(args.st))
    entries = read_manifest(data_dir, args.split, args.limit)
    kjv = kjv_text([e["ref"] for e in entries])
    asr_run, mt_run = Path(args.asr), Path(args.mt)
    pipeline = Pipeline.from_runs([asr_run, mt_run])
    sr = pipeline.transcriber.sample_rate
    waves = [(read_audio(data_dir / e["audio"], sr).numpy(), sr) for e in entries]
    mt = pipeline.stages[1]
    b = {"batch_size": args.batch}

    st_runs = {}
    for k, item in enumerate(args.st + args.ablation):
        label, run, checkpoint = parse_run(item, "end to end" if k == 0 else f"run {k + 1}")
        st_runs[label] = (run, checkpoint, k >= len(args.st))
    st_models = {label: Transcriber.from_run(run, checkpoint)
                 for label, (run, checkpoint, _) in st_runs.items()}

    # name -> (inputs, decode(inputs) -> texts, training minutes, what makes it)
    kjv_src = [kjv[e["ref"]] for e in entries]
    spoken = [e["transcript"] for e in entries]
    mt_min = run_minutes(mt_run)
    systems = {
        "MT, KJV text": (kjv_src, lambda xs: mt.translate(xs, **b), mt_min, [str(mt_run)]),
        "MT, spoken transcript": (spoken, lambda xs: mt.translate(xs, **b), mt_min, [str(mt_run)]),
        "cascade": (waves, lambda xs: pipeline.run(xs, stage_overrides=[dict(b), dict(b)]),
                    run_minutes(asr_run) + mt_min,
            [str(asr_run), str(mt_run)]),
    }
    untimed = set()
    for label, tr in st_models.items():
        run, checkpoint, ablation = st_runs[label]
        inits = init_runs(run)
        systems[label] = (waves, lambda xs, tr=tr: tr.transcribe(xs, **b),
                          run_minutes(run, checkpoint) + sum(run_minutes(p) for p in inits),
                          [f"{run}@{checkpoint}"] + [str(p) for p in inits])
        if ablation:
            untimed.add(label)

    results = {}
    for name, (inputs, decode, minutes, runs) in systems.items():
        start = time.perf_counter()
        hyps = decode(inputs)
        print(f"{name}: decoded {len(hyps)} in {time.perf_counter() - start:.0f} s",
              file=sys.stderr)
        results[name] = {"groups": score_groups(entries, hyps), "train_minutes": minutes,
                         "runs": runs, "outputs": hyps}

    n = min(args.speed_n, len(entries))
    timed = [name for name in systems if name not in untimed]
    times = {name: [] for name in timed}
    for name in timed:
        inputs, decode = systems[name][:2]
        decode(inputs[:args.batch])  # warm-up, untimed
    for r in range(args.repeats):
        for name in (timed if r % 2 == 0 else timed[::-1]):
            inputs, decode = systems[name][:2]
            start = time.perf_counter()
            decode(inputs[:n])
            times[name].append(time.perf_counter() - start)
    for name in timed:
        results[name]["verses_per_s"] = n / statistics.median(times[name])
        results[name]["times_s"] = times[name]

    groups = [g for g in next(iter(results.values()))["groups"] if g != "all"]
    width = max(len(name) for name in results)
    head = (f"{'system':<{width}} | {'train min':>9}"
            + "".join(f" | {g + ' BLEU':>11} {g + ' chrF':>11}" for g in groups)
            + f" | {'verses/s':>8} | {'vs cascade':>10}")
    print(f"{args.split}: {len(entries)} utterances; speed over {n}, {args.threads} threads, "
          f"batch {args.batch}, median of {args.repeats}")
    print(head)
    print("-" * len(head))
    for name, res in results.items():
        speed = (f" | {res['verses_per_s']:8.2f} | "
                 f"{res['verses_per_s'] / results['cascade']['verses_per_s']:9.2f}x"
                 if "verses_per_s" in res else f" | {'-':>8} | {'-':>10}")
        print(f"{name:<{width}} | {res['train_minutes']:9.1f}"
              + "".join(f" | {res['groups'][g]['bleu']:11.2f} {res['groups'][g]['chrf']:11.2f}"
                        for g in groups) + speed)
    sig = results["cascade"]["groups"]["all"]
    print(f"BLEU {sig['bleu_signature']}  chrF {sig['chrf_signature']}")
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"command": "python " + shlex.join(sys.argv), "results": results,
             "ids": [e["id"] for e in entries]}, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
