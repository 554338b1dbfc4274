"""Speech corpora built offline: `bible-speech`, KJV verses spoken by synthesizers built from
real recordings (Debian flite voices) and espeak-ng voices, plus a few real read sentences
(Debian pocketsphinx-testdata). ``voice_set="wide"`` adds five training voices: a festival
diphone voice recorded from another speaker (Debian festvox-kdlpc16k), two flite voices at a
raised pitch (toward the held-out woman's) and two more espeak-ng voices. The held-out voices
speak exactly the same test utterances in both sets, so unseen-voice error rates compare.

A speech data directory::

    meta.json                     voices, hours per split and per voice, options
    audio/SPLIT/ID.flac           16 kHz mono FLAC
    SPLIT.manifest.jsonl          {"id", "audio", "duration", "text", "voice", "group", "ref",
                                   "es"} per utterance; group is seen, unseen or real

The verses and their train/dev/test chapters are those of `bible-en-es`, so speech
translation reuses the audio with the Spanish verse (``es``). Training voices never speak
dev or test verses' "unseen" copies: the test split holds every test verse twice, once by a
training ("seen") voice and once by a held-out ("unseen") one, so the two WERs compare the
same sentences. Synthesis runs over both cores, writes each file under a temporary name and
renames it, and skips files already there, so a killed prepare continues where it stopped.

`bible-speech-es` (speech translation, English speech -> Spanish text) is built from a
bible-speech directory without new audio: its manifests point at the same FLAC files
(``../bible-speech/audio/...``), with the Spanish verse as "text" (the target) and the English
transcript as "transcript" (for the auxiliary CTC loss); the real recordings have no Spanish.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from encdec.data.corpus import DataError
from encdec.files import atomic_write_text

SAMPLE_RATE = 16000
MAX_SECONDS = 12.0  # verses spoken longer than this are left out (counted)
REAL_DIR = Path("/usr/share/pocketsphinx/test/data")
# the engine's command and the Debian packages that provide it (with the voice, for festival)
ENGINES = {"flite": ("flite", ("flite",)), "espeak-ng": ("espeak-ng", ("espeak-ng",)),
           "festival": ("text2wave", ("festival", "festvox-kdlpc16k"))}


@dataclass(frozen=True)
class Voice:
    name: str
    engine: str  # flite | espeak-ng | festival
    voice: str  # the engine's own voice name
    seen: bool  # used for training (else held out for the unseen-voice test)
    # mean F0 in Hz (flite, festival) or espeak-ng's pitch (0-99) that rate/pitch vary around
    pitch: float


VOICES = [
    Voice("flite-rms", "flite", "rms", True, 95.0),
    Voice("flite-awb", "flite", "awb", True, 105.0),
    Voice("flite-kal16", "flite", "kal16", True, 105.0),
    Voice("espeak-en-us", "espeak-ng", "en-us", True, 50.0),
    Voice("espeak-en-gb-f3", "espeak-ng", "en-gb+f3", True, 50.0),
    Voice("espeak-en-029", "espeak-ng", "en-029", True, 50.0),
    Voice("flite-slt", "flite", "slt", False, 165.0),
    Voice("espeak-en-gb-scotland-f4", "espeak-ng", "en-gb-scotland+f4", False, 50.0),
]
# More training voices (``voice_set="wide"``). ked is a diphone voice of its own speaker;
# awb and kal16 follow a raised F0 target (rms ignores it, so it is not here). pocketsphinx's
# WER on 40 dev verses (benchmarks/tts_voices.py): ked 48.7 %, kal16 45.2, slt 47.5.
EXTRA_VOICES = [
    Voice("festival-ked", "festival", "ked_diphone", True, 105.0),
    Voice("flite-awb-high", "flite", "awb", True, 175.0),
    Voice("flite-kal16-high", "flite", "kal16", True, 180.0),
    Voice("espeak-en-us-f2", "espeak-ng", "en-us+f2", True, 50.0),
    Voice("espeak-en-gb-x-rp", "espeak-ng", "en-gb-x-rp", True, 50.0),
]
CATALOGUE = {v.name: v for v in VOICES + EXTRA_VOICES}
VOICE_SETS = {"standard": VOICES, "wide": VOICES + EXTRA_VOICES}


def voice_set(name: str) -> list[Voice]:
    if name not in VOICE_SETS:
        raise DataError(f"bible-speech: unknown voice set {name!r}; choose one of "
                        f"{', '.join(VOICE_SETS)}")
    return VOICE_SETS[name]


def missing_engines(voices: list[Voice]) -> list[str]:
    """Debian packages the voices need that are not installed (their commands not found)."""
    missing = []
    for engine in dict.fromkeys(v.engine for v in voices):
        command, packages = ENGINES[engine]
        if shutil.which(command) is None:
            missing += packages
        elif engine == "festival":
            for v in voices:
                if v.engine == "festival" and not _festival_has(v.voice):
                    missing.append(packages[1])
    return list(dict.fromkeys(missing))


def _festival_has(voice: str) -> bool:
    return any(Path("/usr/share/festival/voices").glob(f"*/{voice}"))

_PUNCT = re.compile(r"[^a-z' ]+")


def normalize_transcript(text: str) -> str:
    """What is heard: lowercase words; punctuation dropped (apostrophes kept), hyphens split."""
    text = _PUNCT.sub(" ", text.lower().replace("-", " "))
    return " ".join(w.strip("'") for w in text.split() if w.strip("'"))


def _unit(key: str) -> float:
    """A number in [0, 1) from a string, the same on every machine."""
    return int(hashlib.md5(key.encode()).hexdigest()[:8], 16) / 2**32


@dataclass(frozen=True)
class Utterance:
    id: str
    split: str
    text: str  # what the synthesizer reads (the verse as printed)
    voice: str
    rate: float  # speaking-time factor: above 1 slower
    pitch: float  # relative pitch: 1 is the voice's own
    ref: str = ""
    es: str = ""


def synthesize(utt: Utterance, path: Path) -> float:
    """Speak ``utt`` into ``path`` (16 kHz FLAC, written under a temporary name); seconds."""
    import soundfile

    from encdec.audio.io import resample

    voice = CATALOGUE[utt.voice]
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "out.wav"
        text = None  # festival reads the text from stdin
        if voice.engine == "flite":
            cmd = ["flite", "-voice", voice.voice, "--setf", f"duration_stretch={utt.rate:.3f}",
                   "--setf", f"int_f0_target_mean={voice.pitch * utt.pitch:.1f}",
                   "-t", utt.text, "-o", str(wav)]
        elif voice.engine == "festival":  # diphone voices: linear-regression intonation
            f0 = voice.pitch * utt.pitch
            cmd = ["text2wave", "-eval", f"(voice_{voice.voice})",
                   "-eval", f"(Parameter.set 'Duration_Stretch {utt.rate:.3f})",
                   "-eval", f"(set! int_lr_params '((target_f0_mean {f0:.1f}) (target_f0_std "
                            f"{0.14 * f0:.1f}) (model_f0_mean 170) (model_f0_std 34)))",
                   "-o", str(wav)]
            text = utt.text
        else:  # words per minute (175 by default) and pitch 0-99
            cmd = ["espeak-ng", "-v", voice.voice, "-s", str(int(165 / utt.rate)),
                   "-p", str(int(voice.pitch * utt.pitch)), "-w", str(wav), "--", utt.text]
        done = subprocess.run(cmd, input=text, capture_output=True, text=True)
        if done.returncode != 0 or not wav.exists():
            raise DataError(f"{voice.engine} failed on {utt.id}: {done.stderr.strip()[-300:]}")
        samples, rate = soundfile.read(str(wav), dtype="float32")
    samples = resample(samples, rate, SAMPLE_RATE)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.tmp")
    soundfile.write(str(partial), samples, SAMPLE_RATE, format="FLAC")
    os.replace(partial, path)
    return len(samples) / SAMPLE_RATE


def _synthesize_one(job: tuple[Utterance, str]) -> tuple[str, float]:
    utt, path = job
    path = Path(path)
    if path.exists():  # done by an earlier, interrupted prepare
        import soundfile

        return utt.id, soundfile.info(str(path)).duration
    return utt.id, synthesize(utt, path)


def synthesize_plan(plan: list[Utterance], out: Path, workers: int, name: str, log=print):
    """Synthesize ``plan`` into out/audio/SPLIT/ID.flac over ``workers`` processes, keeping the
    files an earlier (killed) prepare wrote; ([(utterance, path)], {id: seconds})."""
    from tqdm import tqdm

    jobs = [(u, str(out / "audio" / u.split / f"{u.id}.flac")) for u in plan]
    todo = sum(1 for _, p in jobs if not Path(p).exists())
    log(f"{name}: {len(plan)} utterances planned, {len(plan) - todo} already synthesized")
    durations: dict[str, float] = {}
    with ProcessPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(jobs), unit="utt", mininterval=1.0, disable=todo == 0) as bar:
        for uid, seconds in pool.map(_synthesize_one, jobs, chunksize=16):
            durations[uid] = seconds
            bar.update(1)
    return jobs, durations


def plan_bible_speech(train_hours: float = 10.0, eval_verses: int = 400, books=None,
                      split_verses: tuple[int, int] | None = None, log=print,
                      voices: list[Voice] = VOICES) -> list[Utterance]:
    """Which verse each voice speaks, at which rate and pitch: deterministic. ``books`` and
    ``split_verses`` (dev, test verses) make small corpora for tests."""
    from encdec.data.recipes import align_bibles

    sizes = dict(zip(("dev_verses", "test_verses"), split_verses)) if split_verses else {}
    bible = align_bibles("kjv", "rv1909", books, log=log, **sizes)
    seen = [v.name for v in voices if v.seen]
    unseen = [v.name for v in voices if not v.seen]
    by_split: dict[str, list] = {"train": [], "dev": [], "test": []}
    for ref in bible.common:
        by_split[bible.split[ref]].append(ref)
    # Shorter verses first would bias the corpus; a hash order keeps it a fair sample.
    for refs in by_split.values():
        refs.sort(key=lambda r: _unit("order:" + ".".join(map(str, r))))
    # Speaking rate is about 15 characters per second: leave out verses that would run over.
    fits = lambda ref: len(bible.src[ref]) <= MAX_SECONDS * 13
    plan, train_seconds = [], 0.0
    for split, refs in by_split.items():
        refs = [r for r in refs if fits(r)]
        if split != "train":
            refs = refs[:eval_verses]
        for ref in refs:
            key = ".".join(map(str, ref))
            copies = [("seen", seen)] + ([("unseen", unseen)] if split == "test" else [])
            for group, names in copies:
                voice = names[int(_unit(f"voice:{group}:{key}") * len(names))]
                plan.append(Utterance(
                    id=f"{key}.{voice}", split=split, text=bible.src[ref], voice=voice,
                    rate=0.9 + 0.2 * _unit("rate:" + key), pitch=0.9 + 0.2 * _unit("pitch:" + key),
                    ref=key, es=bible.tgt[ref]))
            if split == "train":
                # printed characters per spoken second, measured over the six training voices
                # (16.6); a little more, so the hours asked for are reached
                train_seconds += len(bible.src[ref]) / 17.0
                if train_seconds >= train_hours * 3600:
                    break
    return plan


def real_recordings() -> list[dict]:
    """The real read sentences of pocketsphinx-testdata (LibriVox clips and card names)."""
    entries = []
    for folder, listing in (("librivox", "transcription"), ("cards", "cards.transcription")):
        path = REAL_DIR / folder / listing
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            m = re.match(r"\s*<s>(.*)</s>\s*\((.+)\)\s*$", line)
            if m:
                entries.append({"id": f"{folder}-{m.group(2)}", "file": REAL_DIR / folder /
                                f"{m.group(2)}.wav", "text": " ".join(m.group(1).split())})
    return entries


def prepare_speech(out_dir: str | Path, *, train_hours: float = 10.0, eval_verses: int = 400,
                   books=None, split_verses: tuple[int, int] | None = None, workers: int = 2,
                   vocab_size: int = 256, voices: str = "standard", log=print) -> dict:
    """Build (or continue building) the bible-speech data directory ``out_dir``; ``voices``
    names the voice set (``VOICE_SETS``)."""
    import soundfile

    from encdec.audio.io import read_audio

    chosen = voice_set(voices)
    missing = missing_engines(chosen)
    if missing:
        raise DataError(f"bible-speech ({voices} voices) needs the Debian packages "
                        f"{' '.join(missing)} (`make sysdeps` installs them)")
    out = Path(out_dir)
    plan = plan_bible_speech(train_hours, eval_verses, books, split_verses, log, chosen)
    jobs, durations = synthesize_plan(plan, out, workers, "bible-speech", log)

    manifests: dict[str, list[dict]] = {"train": [], "dev": [], "test": [], "real": []}
    dropped = {"over_max_seconds": 0}
    seen_names = {v.name for v in chosen if v.seen}
    for utt, path in jobs:
        if durations[utt.id] > MAX_SECONDS:
            dropped["over_max_seconds"] += 1
            continue
        manifests[utt.split].append({
            "id": utt.id, "audio": os.path.relpath(path, out), "duration": round(durations[utt.id], 3),
            "text": normalize_transcript(utt.text), "voice": utt.voice,
            "group": "seen" if utt.voice in seen_names else "unseen", "ref": utt.ref, "es": utt.es})
    for entry in real_recordings():
        target = out / "audio" / "real" / f"{entry['id']}.flac"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            samples = read_audio(entry["file"], SAMPLE_RATE).numpy()
            soundfile.write(str(target), samples, SAMPLE_RATE, format="FLAC")
        manifests["real"].append({
            "id": entry["id"], "audio": os.path.relpath(target, out),
            "duration": round(soundfile.info(str(target)).duration, 3),
            "text": normalize_transcript(entry["text"]), "voice": "real", "group": "real",
            "ref": "", "es": ""})
    hours = {split: round(sum(e["duration"] for e in m) / 3600, 3) for split, m in manifests.items()}
    per_voice: dict[str, dict[str, float]] = {}
    for split, m in manifests.items():
        for e in m:
            per_voice.setdefault(e["voice"], {}).setdefault(split, 0.0)
            per_voice[e["voice"]][split] += e["duration"] / 3600
    for split, m in manifests.items():
        with open(out / f".{split}.manifest.jsonl.tmp", "w", encoding="utf-8") as f:
            for e in m:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")
        os.replace(out / f".{split}.manifest.jsonl.tmp", out / f"{split}.manifest.jsonl")
    from encdec.data.utterances import finish_speech_dir

    targets = finish_speech_dir(out, manifests, vocab_size=vocab_size, sample_rate=SAMPLE_RATE,
                                log=log)
    meta = {"format": 1, "name": "bible-speech", "modality": "speech", "sample_rate": SAMPLE_RATE,
            **targets,
            "voices": [asdict(v) for v in chosen], "hours": hours,
            "hours_per_voice": {v: {s: round(h, 3) for s, h in d.items()}
                                for v, d in sorted(per_voice.items())},
            "utterances": {s: len(m) for s, m in manifests.items()}, "dropped": dropped,
            "options": {"train_hours": train_hours, "eval_verses": eval_verses,
                        "max_seconds": MAX_SECONDS, "vocab_size": vocab_size,
                        "voice_set": voices}}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    for split in manifests:
        log(f"{split:>6}: {len(manifests[split]):>6} utterances, {hours[split]:.2f} h")
    for voice, d in sorted(per_voice.items()):
        log(f"  {voice:<26} " + ", ".join(f"{s} {h:.2f} h" for s, h in d.items()))
    log(f"dropped {dropped['over_max_seconds']} over {MAX_SECONDS:g} s -> {out}")
    return meta


ST_SPLITS = ("train", "dev", "test")  # the real recordings have no Spanish verse


def prepare_speech_translation(out_dir: str | Path, speech_dir: str | Path = "data/bible-speech",
                               *, vocab_size: int = 4000, transcript_vocab_size: int = 256,
                               targets_from: str | Path | None = None, force: bool = False,
                               log=print) -> dict:
    """Build the bible-speech-es data directory ``out_dir`` from the bible-speech directory
    ``speech_dir``: same audio, splits and groups; Spanish targets (SentencePiece unigram of
    ``vocab_size``), English transcripts (their own unigram of ``transcript_vocab_size``),
    BLEU/chrF as the metric; the feature statistics are the speech directory's.
    ``targets_from``: a prepared text data directory (bible-en-es) whose target tokenizer and
    vocabulary the Spanish targets use instead of their own, so that the decoder of a
    translation run on that data can start the speech translation model
    (``train.init_decoder_from``)."""
    from encdec.data.prepare import check_replaceable, load_meta, new_tmp_dir, swap_into_place
    from encdec.data.utterances import STATS_FILE, audio_file, finish_speech_dir, read_manifest

    speech_dir, out = Path(speech_dir), Path(out_dir)
    if not (speech_dir / "meta.json").exists():
        raise DataError(f"{speech_dir}: no bible-speech data directory there (no meta.json); "
                        "run `encdec prepare bible-speech` first, or give its folder with "
                        "--speech-dir")
    source = load_meta(speech_dir)
    if source.get("modality") != "speech" or not (speech_dir / STATS_FILE).exists():
        raise DataError(f"{speech_dir} is not a prepared speech data directory "
                        f"({source.get('name', 'no name')}); run `encdec prepare bible-speech`")
    check_replaceable(out, force)
    manifests: dict[str, list[dict]] = {}
    dropped = 0
    for split in ST_SPLITS:
        manifests[split] = []
        for entry in read_manifest(speech_dir, split):
            if "es" not in entry:
                raise DataError(f"{speech_dir}/{split}.manifest.jsonl has no Spanish verses "
                                "(\"es\"): made by an older encdec; prepare bible-speech again")
            if not entry["es"].strip():
                dropped += 1
                continue
            audio = audio_file(speech_dir, entry["audio"]).absolute()
            fields = {k: v for k, v in entry.items() if k not in ("audio", "text", "es")}
            manifests[split].append({**fields, "audio": os.path.relpath(audio, out.absolute()),
                                     "text": entry["es"], "transcript": entry["text"]})
        if not manifests[split]:
            raise DataError(f"{speech_dir}: split {split!r} has no utterance with a Spanish verse")
    tmp = new_tmp_dir(out)  # beside out, so the relative audio paths hold there too
    try:
        for split, m in manifests.items():
            atomic_write_text(tmp / f"{split}.manifest.jsonl",
                              "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in m))
        targets = finish_speech_dir(tmp, manifests, vocab_size=vocab_size, metric="text",
                                    transcript_vocab_size=transcript_vocab_size,
                                    stats_from=speech_dir / STATS_FILE,
                                    sample_rate=source["sample_rate"],
                                    num_mel_bins=source["feature_bins"],
                                    targets_from=targets_from, log=log)
        targets["energy_floor"] = source.get("energy_floor", False)  # the statistics' features
        hours = {s: round(sum(e["duration"] for e in m) / 3600, 3) for s, m in manifests.items()}
        meta = {"format": 1, "name": "bible-speech-es", "modality": "speech",
                "sample_rate": source["sample_rate"], **targets,
                "voices": source.get("voices", []), "hours": hours,
                "utterances": {s: len(m) for s, m in manifests.items()},
                "dropped": {"no_spanish": dropped},
                "options": {"vocab_size": vocab_size, "transcript_vocab_size": transcript_vocab_size,
                            "speech_dir": str(speech_dir),
                            "targets_from": str(targets_from) if targets_from else None,
                            "speech_utterances": source.get("utterances")}}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for split, m in manifests.items():
        log(f"{split:>6}: {len(m):>6} utterances, {hours[split]:.2f} h")
    log(f"bible-speech-es: English speech of {speech_dir} -> Spanish text -> {out}")
    return meta
