"""`encdec evaluate` on a text-to-speech run: intelligibility by an independent judge, mel
cepstral distortion against the recording, durations and speed.

For each utterance of the split (the voice's own recordings of the test verses), three
systems are judged by PocketSphinx (``encdec.audio.judge``) on the same verses:

* ``reference``: the recording itself (the judge's ceiling on this voice);
* ``copy``: the recording's log-mel frames through the vocoder (Griffin-Lim; the vocoder's
  ceiling: what a perfect mel predictor would reach);
* ``model``: the run's synthesis of the verse's text.

With ``asr_judge`` (``encdec evaluate TTS_RUN --asr-judge ASR_RUN``) the same audio is also
transcribed by an encdec speech recognition run, with its own decoding settings, and scored
the same way under ``"asr_judge"``: a second opinion, labelled as encdec's own, not independent
(a recognizer trained on the same kind of synthesized speech may forgive what pocketsphinx
would not).

Scores: round-trip WER and CER of the judge's transcripts against the verse (both through
``judge_text``); mel cepstral distortion (MCD) of the model's frames against the recording's,
after dynamic time warping; the model's total duration over the recordings'; real-time factors
of mel generation and of the vocoder (seconds of compute per second of audio, on the threads
torch uses).

MCD here: cepstra of the log amplitude on the mel axis, from the 80 log-mel power bins the model
predicts (a cosine transform, ``mel_cepstra``), coefficients 1-13 (energy c0 left out); per
frame 10 / ln 10 * sqrt(2 * sum (c - c')^2) dB, averaged along the DTW path that minimizes the
summed Euclidean distance between the two sequences' cepstra (steps (1,0), (0,1), (1,1)). It is
not SPTK's mel-generalized cepstrum from a 1024-point spectrum: compare figures within encdec
rather than with published ones.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from encdec.data.corpus import DataError

MCD_COEFFS = 13


def mel_cepstra(log_mel: np.ndarray, coeffs: int = MCD_COEFFS) -> np.ndarray:
    """(T, F) natural-log mel power -> (T, coeffs) cepstra c1..c_coeffs of the log amplitude on
    the mel axis: c_k = 1/F sum_n (log_mel_n / 2) cos(pi k (n + 1/2) / F), the real cepstrum of
    an even-symmetric spectrum, the scale the usual MCD figures are on."""
    F = log_mel.shape[1]
    n = np.arange(F)
    k = np.arange(1, coeffs + 1)[:, None]
    basis = np.cos(np.pi * k * (2 * n + 1) / (2 * F)) / F  # (coeffs, F)
    return (0.5 * log_mel.astype(np.float64)) @ basis.T


def dtw_path(cost: np.ndarray) -> list[tuple[int, int]]:
    """The monotonic path from (0, 0) to (I-1, J-1) with the least summed ``cost`` (I, J),
    steps (1,0), (0,1), (1,1). Each row is one vectorized pass: with m_j the best arrival from
    the row above, D_j = min(m_j, D_{j-1} + c_j) = S_j + min_{k<=j}(m_k - S_k), S = cumsum(c)."""
    I, J = cost.shape
    D = np.empty((I, J))
    D[0] = np.cumsum(cost[0])
    for i in range(1, I):
        above = D[i - 1]
        diag = np.concatenate(([np.inf], above[:-1]))
        m = cost[i] + np.minimum(above, diag)
        S = np.cumsum(cost[i])
        D[i] = S + np.minimum.accumulate(m - S)
    path = [(I - 1, J - 1)]
    i, j = I - 1, J - 1
    while i > 0 or j > 0:
        options = []
        if i > 0 and j > 0:
            options.append((D[i - 1, j - 1], i - 1, j - 1))
        if i > 0:
            options.append((D[i - 1, j], i - 1, j))
        if j > 0:
            options.append((D[i, j - 1], i, j - 1))
        _, i, j = min(options)
        path.append((i, j))
    return path[::-1]


def mcd_dtw(log_mel: np.ndarray, ref_log_mel: np.ndarray) -> float:
    """Mel cepstral distortion (dB) of (T, F) against (T', F) after DTW (module docstring)."""
    a, b = mel_cepstra(log_mel), mel_cepstra(ref_log_mel)
    dist = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))  # (T, T')
    path = dtw_path(dist)
    per_frame = np.array([dist[i, j] for i, j in path])
    return float(10.0 / math.log(10.0) * math.sqrt(2.0) * per_frame.mean())


def _asr_judge(run_dir: str | Path, device: str):
    """The encdec recognizer of the run ``run_dir`` (DataError unless it is one)."""
    from encdec.transcribe import Transcriber
    from encdec.translate import Translator

    if not (Path(run_dir) / "config.yaml").exists():
        raise DataError(f"--asr-judge {run_dir}: not a run directory (no config.yaml)")
    tr = Translator.from_run(run_dir, device=device)
    if not tr.assets.speech or tr.assets.meta.get("metric") != "asr":
        raise DataError(f"--asr-judge {run_dir}: not a speech recognition run (English speech "
                        "to English text, e.g. runs/asr-small from `make asr`)")
    return Transcriber(tr.model, tr.assets, tr.cfg, tr.device, tr.checkpoint_dir)


def evaluate_tts(run_dir: str | Path, split: str = "test", checkpoint_name: str = "best",
                 data_dir: str | None = None, device: str = "cpu", limit: int = 0,
                 length_scale: float = 1.0, batch_size: int = 8, samples: int = 5,
                 asr_judge: str | Path | None = None) -> dict:
    from tqdm import tqdm

    from encdec.audio.io import read_audio
    from encdec.audio.judge import Judge, judge_text
    from encdec.audio.vocoder import vocode
    from encdec.data.utterances import audio_file, read_manifest
    from encdec.metrics import asr_scores
    from encdec.speak import Speaker

    run_dir = Path(run_dir)
    speaker = Speaker.from_run(run_dir, checkpoint_name, device)
    data_dir = data_dir or speaker.cfg.data.dir
    entries = read_manifest(data_dir, split)[: limit or None]
    if not entries:
        raise DataError(f"{data_dir}: split {split!r} has no utterances; nothing to evaluate")
    if speaker.autoregressive and length_scale != 1.0:
        raise DataError("length_scale needs a non-autoregressive (fastspeech) run")
    scale = {} if speaker.autoregressive else {"length_scale": length_scale}
    judge = Judge()
    recognizer = _asr_judge(asr_judge, device) if asr_judge else None
    front = speaker.assets.audio_front
    rate = speaker.sample_rate
    refs = [[judge_text(e["text"])] for e in entries]
    waves = [read_audio(audio_file(data_dir, e["audio"]), rate) for e in entries]
    ref_mels = []
    for w in waves:
        feats, frames = front.log_mel_energies([w])
        ref_mels.append(feats[0, : int(frames[0])])

    # the model: mel frames, then the vocoder, timed apart
    gen_s = voc_s = 0.0
    model_waves, model_mels = [], []
    stats = front.stats
    with tqdm(total=len(entries), unit="utt", file=sys.stderr, mininterval=1.0) as bar:
        for i in range(0, len(entries), batch_size):
            chunk = [e["text"] for e in entries[i:i + batch_size]]
            start = time.perf_counter()
            out, _ = speaker.mels(chunk, **scale)
            gen_s += time.perf_counter() - start
            log_mel = out.mels.float().cpu() * stats.std + stats.mean
            lengths = out.frame_lengths.cpu()
            for b in range(len(chunk)):
                # row by row, as Speaker.speak: a batch's padding would change the random start
                # phase and so the audio of a verse with what it was batched with
                n = int(lengths[b])
                start = time.perf_counter()
                wav = vocode(log_mel[b:b + 1, :n], front.opts)[0]
                voc_s += time.perf_counter() - start
                model_mels.append(log_mel[b, :n].numpy())
                model_waves.append(wav[: n * front.opts.frame_shift].numpy())
            bar.update(len(chunk))
    copy_waves = [vocode(m[None], front.opts)[0].numpy() for m in ref_mels]

    systems = {"reference": [w.numpy() for w in waves], "copy": copy_waves, "model": model_waves}
    hyps, scores = {}, {}
    for name, ws in systems.items():
        hyps[name] = [judge_text(t) for t in judge.transcribe(ws, rate)]
        scores[name] = asr_scores(hyps[name], refs)
        scores[name]["seconds"] = sum(len(w) for w in ws) / rate
    own_hyps, own_scores = {}, {}
    if recognizer is not None:
        for name, ws in systems.items():
            heard = recognizer.transcribe([(np.asarray(w, dtype=np.float32), rate) for w in ws])
            own_hyps[name] = [judge_text(t) for t in heard]
            own_scores[name] = asr_scores(own_hyps[name], refs)
    mcd = [mcd_dtw(m, r.numpy()) for m, r in zip(model_mels, ref_mels)]
    model_s, ref_s = scores["model"]["seconds"], scores["reference"]["seconds"]
    result = {
        "run": str(run_dir), "checkpoint": speaker.checkpoint_dir.name, "split": split,
        "data": str(data_dir), "metric": "tts", "judge": judge.name, "inputs": len(entries),
        "length_scale": length_scale, "arch": speaker.cfg.model.arch,
        "systems": scores, "mcd_db": float(np.mean(mcd)),
        "duration_ratio": model_s / max(ref_s, 1e-9),
        "mel_rtf": gen_s / max(model_s, 1e-9), "vocoder_rtf": voc_s / max(model_s, 1e-9),
        "threads": torch.get_num_threads(),
    }
    if recognizer is not None:
        result["asr_judge"] = {"run": str(asr_judge),
                               "checkpoint": recognizer.checkpoint_dir.name,
                               "systems": own_scores}
    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    # as the text evaluation names its files: another checkpoint's scores do not overwrite
    tag = f"tts-{split}" + (f"-{checkpoint_name}" if checkpoint_name != "best" else "") + \
        (f"-limit{limit}" if limit else "") + \
        (f"-scale{length_scale:g}" if length_scale != 1.0 else "")
    wav_dir = out_dir / tag
    wav_dir.mkdir(exist_ok=True)
    import soundfile

    for i in range(min(samples, len(entries))):
        soundfile.write(str(wav_dir / f"{entries[i]['id']}.wav"), model_waves[i], rate)
    path = out_dir / f"{tag}.json"
    result["written_to"] = str(path)
    result["utterances"] = [{"id": e["id"], "text": e["text"], "scored_against": refs[i][0],
                             "judge_heard": {n: hyps[n][i] for n in systems}, "mcd_db": mcd[i],
                             **({"asr_judge_heard": {n: own_hyps[n][i] for n in systems}}
                                if own_hyps else {})}
                            for i, e in enumerate(entries)]
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result
