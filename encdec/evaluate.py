"""`encdec evaluate RUN --split test`: decode a split, detokenize, score, write JSON."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from encdec.config import DecodeConfig
from encdec.data.corpus import DataError
from encdec.data.dataset import read_eval
from encdec.decoding.audio import decode_audio
from encdec.metrics import score
from encdec.translate import Translator


def _modality(run_dir: Path) -> str:
    try:
        return json.loads((run_dir / "data" / "meta.json").read_text()).get("modality", "text")
    except (OSError, ValueError):
        return "text"  # Translator.from_run says what is wrong with the run


def evaluate(run_dir: str | Path, split: str = "test", checkpoint_name: str = "best",
             data_dir: str | None = None, device: str = "cpu", limit: int = 0,
             rerank: str | Path | None = None, asr_judge: str | Path | None = None,
             **decode_overrides) -> dict:
    """Decode and score a split; ``rerank`` is a run whose model re-orders the candidates;
    ``asr_judge`` a speech recognition run that also judges a text-to-speech run."""
    run_dir = Path(run_dir)
    if _modality(run_dir) == "tts":
        from encdec.evaluate_tts import evaluate_tts

        if rerank:
            raise DataError("--rerank applies to text models")
        return evaluate_tts(run_dir, split, checkpoint_name, data_dir, device, limit,
                            length_scale=decode_overrides.get("length_scale") or 1.0,
                            asr_judge=asr_judge)
    if asr_judge:
        raise DataError(f"--asr-judge judges the audio of a text-to-speech run; {run_dir} is not "
                        "one")
    tr = Translator.from_run(run_dir, checkpoint_name, device)
    if tr.assets.speech:
        if rerank:
            raise DataError("--rerank applies to text models")
        return evaluate_speech(run_dir, split, checkpoint_name, data_dir, device, limit,
                               **decode_overrides)
    reranker = Translator.from_run(rerank, device=device) if rerank else None
    data_dir = data_dir or tr.cfg.data.dir
    entries = read_eval(data_dir, split)
    if limit:
        entries = entries[:limit]
    if not entries:
        raise DataError(f"{data_dir}: split {split!r} has no inputs; there is nothing to evaluate")
    decode_cfg = tr.decode_config(**decode_overrides)
    start = time.perf_counter()
    with tqdm(total=len(entries), unit="input", file=sys.stderr, mininterval=1.0) as bar:
        outputs = tr.translate_nbest([e["src"] for e in entries], progress=bar.update,
                                     rerank=reranker, **decode_overrides)
    seconds = time.perf_counter() - start
    hyps = [o[0].text for o in outputs]
    result = {
        "run": str(run_dir), "checkpoint": tr.checkpoint_dir.name, "split": split,
        "data": str(data_dir), "metric": tr.assets.meta["metric"],
        "decode": decode_cfg.__dict__, "rerank": str(rerank) if rerank else None,
        "inputs": len(entries), "seconds": seconds,
        "inputs_per_s": len(entries) / max(seconds, 1e-9),
        "scores": score(tr.assets.meta["metric"], hyps, [e["refs"] for e in entries]),
    }
    return _write(result, hyps, run_dir, tr, split, checkpoint_name, data_dir, limit,
                  decode_cfg, rerank)


def _write(result, hyps, run_dir, tr, split, checkpoint_name, data_dir, limit, decode_cfg, rerank):
    out_dir = run_dir / "eval"
    out_dir.mkdir(exist_ok=True)
    tag = f"{split}-{decode_cfg.method}{decode_cfg.beam_size if decode_cfg.method == 'beam' else ''}"
    if decode_cfg.method == "nat":
        tag = f"{split}-nat{decode_cfg.iterations}"
        tag += f"-lb{decode_cfg.length_beam}" if decode_cfg.length_beam > 1 else ""
        tag += f"-ls{decode_cfg.length_scale:g}" if decode_cfg.length_scale != 1 else ""
        tag += "-every-pass" if not decode_cfg.early_exit and decode_cfg.iterations > 1 else ""
    if decode_cfg.method == "beam" and decode_cfg.ctc_weight > 0:
        tag += f"-ctc{decode_cfg.ctc_weight:g}"
    if decode_cfg.method == "beam" and decode_cfg.length_penalty != DecodeConfig.length_penalty:
        tag += f"-lp{decode_cfg.length_penalty:g}"
    tag += "-rerank" if rerank else ""
    # Results of other checkpoints, subsets or data never overwrite each other.
    tag += f"-{checkpoint_name}" if checkpoint_name != "best" else ""
    tag += f"-first{limit}" if limit else ""
    if Path(data_dir).resolve() != Path(tr.cfg.data.dir).resolve():
        tag += f"-data-{Path(data_dir).resolve().name}"
    (out_dir / f"{tag}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out_dir / f"{tag}.hyp").write_text("".join(h + "\n" for h in hyps), encoding="utf-8")
    result["written_to"] = str(out_dir / f"{tag}.json")
    return result


def evaluate_speech(run_dir: Path, split: str = "test", checkpoint_name: str = "best",
                    data_dir: str | None = None, device: str = "cpu", limit: int = 0,
                    **decode_overrides) -> dict:
    """Scores of a speech run on a split, overall and per voice group (seen, unseen, real), by
    the data's metric: WER and CER for recognition ("asr"), sacreBLEU BLEU and chrF with their
    signatures for translation ("text"); with the real-time factor of decoding (audio loading
    excluded)."""
    from encdec.data.utterances import audio_file, read_manifest
    from encdec.transcribe import Transcriber

    tr = Transcriber.from_run(run_dir, checkpoint_name, device)
    data_dir = data_dir or tr.cfg.data.dir
    entries = read_manifest(data_dir, split)[: limit or None]
    if not entries:
        raise DataError(f"{data_dir}: split {split!r} has no utterances; nothing to evaluate")
    decode_cfg = tr.decode_config(**decode_overrides)
    waves = [tr.load(audio_file(data_dir, e["audio"])) for e in entries]
    audio_s = sum(w.numel() for w in waves) / tr.sample_rate
    start = time.perf_counter()
    with tqdm(total=len(entries), unit="utt", file=sys.stderr, mininterval=1.0) as bar:
        outputs = decode_audio(tr.model, waves, cfg=decode_cfg, device=tr.device,
                               max_segment_s=tr.max_segment_s, progress=bar.update,
                               **tr.assets.audio_kwargs())
    seconds = time.perf_counter() - start
    hyps = [o[0].text for o in outputs]
    refs = [[e["text"]] for e in entries]
    groups: dict[str, list[int]] = {}
    voices: dict[str, list[int]] = {}  # which voice of a group lags (e.g. one held-out voice)
    for i, e in enumerate(entries):
        groups.setdefault(e.get("group", "all"), []).append(i)
        voices.setdefault(e.get("voice", ""), []).append(i)
    metric = tr.assets.meta["metric"]
    result = {
        "run": str(run_dir), "checkpoint": tr.checkpoint_dir.name, "split": split,
        "data": str(data_dir), "metric": metric, "decode": decode_cfg.__dict__, "rerank": None,
        "inputs": len(entries), "seconds": seconds, "inputs_per_s": len(entries) / seconds,
        "audio_seconds": audio_s, "real_time_factor": seconds / max(audio_s, 1e-9),
        "threads": torch.get_num_threads(),
        "scores": score(metric, hyps, refs),
        "groups": {g: score(metric, [hyps[i] for i in idx], [refs[i] for i in idx])
                   for g, idx in sorted(groups.items())},
        # per voice, when the manifest names more than one
        "voices": {v: {"group": entries[idx[0]].get("group", "all"),
                       **score(metric, [hyps[i] for i in idx], [refs[i] for i in idx])}
                   for v, idx in sorted(voices.items())} if len(voices) > 1 else {},
    }
    return _write(result, hyps, run_dir, tr, split, checkpoint_name, data_dir, limit,
                  decode_cfg, None)

