"""How much an autoregressive TTS run loses to its own inputs: the judge on its frames when fed
the recording's previous frames (teacher forcing, as in training) against its synthesis, fed
its own (exposure bias).

    python benchmarks/tts_exposure.py RUN [--checkpoint best] [--limit 20] [--split test] [--show N]

For the first ``--limit`` verses of the split: the run's teacher-forced frames after the
post-net (``loss`` on the recording's frames, pre-net dropout on as in
training and synthesis) and its synthesis (``Speaker.speak``), each through the same
Griffin-Lim vocoder, transcribed by the judge (PocketSphinx) and scored as ``encdec evaluate``
scores them (WER/CER against the verse). Prints both rows and writes
``RUN/eval/exposure-SPLIT-CHECKPOINT-limitN.json``; ``--show N`` also prints what the judge
heard in the first N verses, beside the verse.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encdec.audio.io import read_audio  # noqa: E402
from encdec.audio.judge import Judge, judge_text  # noqa: E402
from encdec.audio.vocoder import vocode  # noqa: E402
from encdec.data.utterances import audio_file, read_manifest  # noqa: E402
from encdec.metrics import asr_scores  # noqa: E402
from encdec.speak import Speaker  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run")
    ap.add_argument("--checkpoint", default="best")
    ap.add_argument("--split", default="test")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--show", type=int, default=0,
                    help="print the judge's transcripts of the first N verses")
    args = ap.parse_args(argv)

    speaker = Speaker.from_run(args.run, args.checkpoint, "cpu")
    if not speaker.autoregressive:
        sys.exit(f"{args.run}: not an autoregressive (transformer_tts, tacotron2) run")
    model, front = speaker.model.eval(), speaker.assets.audio_front
    stats, rate = front.stats, speaker.sample_rate
    data_dir = speaker.cfg.data.dir
    entries = read_manifest(data_dir, args.split)[: args.limit]
    refs = [[judge_text(e["text"])] for e in entries]
    torch.manual_seed(args.seed)

    forced = []
    for e in entries:
        wave = read_audio(audio_file(data_dir, e["audio"]), rate)
        feats, frames = front.log_mel_energies([wave])
        mels = stats.normalize(feats[:, : int(frames[0])]).float()
        ids = torch.tensor([speaker.input_ids(e["text"])])
        with torch.no_grad():
            _, parts = model.loss(ids, mels, torch.tensor([mels.size(1)]))
            after = model._postnet(parts["before"],
                                   torch.ones(parts["before"].shape[:2], dtype=torch.bool))
        forced.append(vocode(after * stats.std + stats.mean, front.opts)[0].numpy())
    synthesized = [s.audio for s in speaker.speak([e["text"] for e in entries])]

    judge = Judge()
    result = {"run": args.run, "checkpoint": speaker.checkpoint_dir.name, "split": args.split,
              "inputs": len(entries), "judge": judge.name, "systems": {}}
    heard = {}
    for name, waves in (("teacher_forced", forced), ("synthesized", synthesized)):
        hyps = [judge_text(t) for t in judge.transcribe(waves, rate)]
        heard[name] = hyps
        scores = asr_scores(hyps, refs)
        scores["seconds"] = sum(len(w) for w in waves) / rate
        result["systems"][name] = scores
        print(f"  {name:<16} WER {scores['wer']:6.2f}  CER {scores['cer']:6.2f}  "
              f"{scores['seconds']:7.1f} s")
    for i in range(min(args.show, len(entries))):
        print(f"  [{i}] verse           {refs[i][0]}")
        for name, hyps in heard.items():
            print(f"      {name:<16}{hyps[i]}")
    out = Path(args.run) / "eval" / \
        f"exposure-{args.split}-{speaker.checkpoint_dir.name}-limit{len(entries)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"  -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
