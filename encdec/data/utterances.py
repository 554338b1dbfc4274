"""Speech splits for training and the audio front shared with decoding: manifests -> batches
of normalized log-mel frames with their lengths, and the transcripts' token ids.

A speech data directory (``encdec prepare bible-speech``, or a user's audio list) holds, besides
the manifests and audio (see ``encdec.data.speech``)::

    spm.tgt.model  tgt.vocab            target tokenizer and vocabulary (trained on train text)
    SPLIT.tgt.tokens.npy / .offsets.npy  transcript ids, memory-mapped, one row per manifest line
    feats.stats.safetensors              per-bin feature sums for global mean/variance normalization

Speech translation data (``encdec prepare bible-speech-es``, or an audio list with transcripts)
has the translation as "text" (the target) and the source-language transcript as "transcript",
binarized with a tokenizer of its own for the auxiliary CTC loss::

    spm.transcript.model  transcript.vocab                   transcript tokenizer and vocabulary
    SPLIT.transcript.tokens.npy / .offsets.npy               transcript ids

Audio paths in a manifest are relative to its directory (``../bible-speech/audio/...`` when the
audio is another data directory's) or absolute.

Features are computed from the FLAC audio when a batch is built: a 10 s utterance costs about
a millisecond to decode and featurize, far below its training step, and the waveform is where
speed perturbation and additive noise belong (Ko et al., 2015). Augmentation draws from a
generator seeded by (seed, epoch, batch, process), so a resumed run sees the same batches.

Dimensions: B utterances, N samples, T frames, F feature bins.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from encdec.audio.features import FbankOptions, LogMel, num_frames
from encdec.audio.normalize import FeatureStats
from encdec.audio.specaugment import SpecAugment
from encdec.data.corpus import DataError
from encdec.data.dataset import teacher_forcing
from encdec.data.vocab import PAD

STATS_FILE = "feats.stats.safetensors"
TRANSCRIPT = "transcript"  # the manifest field and file stem of source-language transcripts


def audio_file(data_dir: str | Path, audio: str) -> Path:
    """The file of a manifest's ``audio`` entry: absolute, or relative to ``data_dir``. The
    path is normalized as written (``a/b/../c`` is ``a/c``), the way ``os.path.relpath`` made it."""
    return Path(os.path.normpath(Path(data_dir) / audio))


def read_manifest(data_dir: str | Path, split: str) -> list[dict]:
    path = Path(data_dir) / f"{split}.manifest.jsonl"
    if not path.exists():
        raise DataError(f"{data_dir}: split {split!r} is missing ({path.name})")
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                entry = json.loads(line)
                entry["audio"], entry["duration"], entry["text"]  # noqa: B018 - required keys
            except (ValueError, KeyError, TypeError) as err:
                raise DataError(f"{path}:{lineno}: not a manifest line with audio, duration and "
                                f"text ({err})") from None
            entries.append(entry)
    return entries


class AudioFront:
    """Waveforms -> normalized log-mel features, the same for training and decoding.

    ``energy_floor``: each band's energy gets the expected energy of white noise of one 16-bit
    step added (log(e^f + floor)): what Kaldi's default dither of 1.0 does, without its
    randomness. Synthesized speech holds stretches of exact digital silence whose log energy
    would sit at log(float epsilon) = -15.9, far from any recording's; those outliers made up 13 %
    of the espeak-ng voices' features and dominated the normalization statistics.
    """

    def __init__(self, stats: FeatureStats | None, opts: FbankOptions = FbankOptions(),
                 energy_floor: bool = True):
        self.opts = opts
        self.log_mel = LogMel(opts).eval()
        self.stats = stats
        self.log_floor = self._noise_log_energy() if energy_floor else None

    def _noise_log_energy(self) -> torch.Tensor:
        """(F,) log of the mean mel energy of unit-variance white noise (10 s, fixed seed)."""
        noise = torch.randn(1, 10 * self.opts.sample_rate, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            feats, _ = self.log_mel(noise)
        return feats[0].exp().mean(dim=0).log()

    @property
    def sample_rate(self) -> int:
        return self.opts.sample_rate

    def log_mel_energies(self, waves: list[torch.Tensor], warps: list[float] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, F) floored log-mel energies (not normalized; zero past each row's end) and
        (B,) frame counts of mono [-1, 1] waveforms at ``sample_rate``; ``warps``: a
        frequency-warp factor per waveform (training augmentation), None for none."""
        lengths = torch.tensor([w.numel() for w in waves])
        batch = torch.zeros(len(waves), int(lengths.max()))
        for b, w in enumerate(waves):
            batch[b, : w.numel()] = w
        with torch.no_grad():
            feats, frames = self.log_mel(batch * 32768.0, lengths, warps)  # Kaldi's 16-bit range
            if self.log_floor is not None:
                feats = torch.logaddexp(feats, self.log_floor)
        real = torch.arange(feats.size(1))[None, :] < frames[:, None]
        return feats.masked_fill(~real[..., None], 0.0), frames

    def __call__(self, waves: list[torch.Tensor], warps: list[float] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized features (B, T, F), zero past each row's end, and (B,) frame counts."""
        feats, frames = self.log_mel_energies(waves, warps)
        feats = self.stats.normalize(feats)
        real = torch.arange(feats.size(1))[None, :] < frames[:, None]
        return feats.masked_fill(~real[..., None], 0.0), frames

    @classmethod
    def load(cls, directory: str | Path, meta: dict) -> "AudioFront":
        path = Path(directory) / STATS_FILE
        if not path.exists():
            raise DataError(f"{directory}: no feature statistics ({STATS_FILE}); prepare the "
                            "speech data again with this version of encdec")
        opts = FbankOptions(sample_rate=meta["sample_rate"], num_mel_bins=meta["feature_bins"])
        return cls(FeatureStats.load(path), opts, energy_floor=meta.get("energy_floor", False))


class Augmenter:
    """Training-time augmentation: speed perturbation and additive noise on the waveform,
    vocal tract length perturbation in the filterbank, SpecAugment on the features
    (``AugmentConfig``)."""

    def __init__(self, cfg, sample_rate: int):
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.spec = SpecAugment(cfg.freq_masks, cfg.freq_width, cfg.time_masks, cfg.time_width,
                                cfg.time_ratio).train()

    def wave(self, samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        speed = float(rng.choice(self.cfg.speed_perturb))
        if speed != 1.0:
            # Played `speed` times faster: tempo and pitch change together, as in Ko et al.
            import soxr

            samples = soxr.resample(samples, round(self.sample_rate * speed),
                                    self.sample_rate, quality="HQ").astype(np.float32)
        if rng.random() < self.cfg.noise_prob:
            samples = samples + self._noise(samples, rng)
        return samples

    def warps(self, n: int, rng: np.random.Generator) -> list[float] | None:
        """Frequency-warp factors for ``n`` utterances, uniform in ``vtlp``; None (and nothing
        drawn from ``rng``) when it is off."""
        low, high = self.cfg.vtlp
        if low == high == 1.0:
            return None
        return [float(w) for w in rng.uniform(low, high, size=n)]

    def _noise(self, samples: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """White or pink (1/f power) noise scaled to an SNR drawn from ``snr_db``."""
        noise = rng.standard_normal(samples.size).astype(np.float32)
        if rng.random() < 0.5:
            spectrum = np.fft.rfft(noise)
            spectrum /= np.sqrt(np.maximum(np.arange(spectrum.size), 1.0))
            noise = np.fft.irfft(spectrum, n=samples.size).astype(np.float32)
        low, high = self.cfg.snr_db
        snr = rng.uniform(low, high)
        signal_power = float(np.mean(samples ** 2)) + 1e-10
        noise_power = float(np.mean(noise ** 2)) + 1e-10
        return noise * np.float32(np.sqrt(signal_power / (noise_power * 10 ** (snr / 10))))


def load_ids(data_dir: str | Path, split: str, side: str, count: int, what: str):
    """(tokens memory-mapped, offsets) of SPLIT.SIDE ids, checked against the manifest's
    ``count`` utterances."""
    d = Path(data_dir)
    try:
        tokens = np.load(d / f"{split}.{side}.tokens.npy", mmap_mode="r")
        offsets = np.load(d / f"{split}.{side}.offsets.npy")
    except FileNotFoundError as err:
        raise DataError(f"{data_dir}: split {split!r} has no {what} ids "
                        f"({Path(err.filename).name}); prepare the data again") from None
    if len(offsets) != count + 1:
        raise DataError(f"{data_dir}: {split}.manifest.jsonl and {split}.{side}.offsets.npy "
                        "disagree on the number of utterances; prepare the data again")
    return tokens, offsets


def frame_counts(entries: list[dict], sample_rate: int) -> np.ndarray:
    """Feature frames of each manifest entry (from its duration), for batching."""
    opts = FbankOptions(sample_rate=sample_rate)
    return np.array([num_frames(round(e["duration"] * sample_rate), opts) for e in entries],
                    dtype=np.int64)


class UtteranceSplit:
    """One split of a speech data directory: manifest entries, frame counts for batching, the
    targets' token ids and, for speech translation data, the transcripts' (memory-mapped)."""

    def __init__(self, data_dir: str | Path, split: str, sample_rate: int = 16000):
        self.dir = Path(data_dir)
        self.entries = read_manifest(data_dir, split)
        self.tgt_tokens, self.tgt_offsets = load_ids(data_dir, split, "tgt", len(self.entries),
                                                     "transcript")
        self.tgt_lens = np.diff(self.tgt_offsets)
        self.transcript_tokens = self.transcript_offsets = None
        if (self.dir / f"{split}.{TRANSCRIPT}.offsets.npy").exists():
            self.transcript_tokens = np.load(self.dir / f"{split}.{TRANSCRIPT}.tokens.npy",
                                             mmap_mode="r")
            self.transcript_offsets = np.load(self.dir / f"{split}.{TRANSCRIPT}.offsets.npy")
            if len(self.transcript_offsets) != len(self.entries) + 1:
                raise DataError(f"{data_dir}: {split}.manifest.jsonl and "
                                f"{split}.{TRANSCRIPT}.offsets.npy disagree on the number of "
                                "utterances; prepare the data again")
        self.frames = frame_counts(self.entries, sample_rate)
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.entries)

    def tgt(self, i: int) -> np.ndarray:
        return self.tgt_tokens[self.tgt_offsets[i]:self.tgt_offsets[i + 1]]

    @property
    def has_transcripts(self) -> bool:
        return self.transcript_offsets is not None

    def transcript(self, i: int) -> np.ndarray:
        return self.transcript_tokens[self.transcript_offsets[i]:self.transcript_offsets[i + 1]]

    def audio_path(self, i: int) -> Path:
        return audio_file(self.dir, self.entries[i]["audio"])

    def samples(self, i: int) -> np.ndarray:
        from encdec.audio.io import read_audio

        return read_audio(self.audio_path(i), self.sample_rate).numpy()


@dataclass
class SpeechBatch:
    src_feats: torch.Tensor  # (B, T, F) normalized log-mel frames, zero-padded
    src_lengths: torch.Tensor  # (B,) frames per utterance
    tgt_in: torch.Tensor  # (B, T') BOS + transcript
    tgt_out: torch.Tensor  # (B, T') transcript + EOS, PAD-padded
    num_tgt_tokens: int  # non-pad target tokens (including EOS)
    # (B, U) source-language transcript ids, PAD-padded (no BOS/EOS), when the split has them:
    # the auxiliary CTC loss's targets in speech translation
    src_text: torch.Tensor | None = None

    def to(self, device) -> "SpeechBatch":
        src_text = None if self.src_text is None else self.src_text.to(device, non_blocking=True)
        return SpeechBatch(self.src_feats.to(device, non_blocking=True),
                           self.src_lengths.to(device, non_blocking=True),
                           self.tgt_in.to(device, non_blocking=True),
                           self.tgt_out.to(device, non_blocking=True), self.num_tgt_tokens,
                           src_text)


def collate_speech(split: UtteranceSplit, indices: np.ndarray, front: AudioFront,
                   augment: Augmenter | None = None, seed: tuple = (0,)) -> SpeechBatch:
    """A batch of utterances ``indices``; ``augment`` (training) draws from ``seed``."""
    rng = np.random.default_rng(list(seed))
    waves = []
    for i in indices:
        samples = split.samples(int(i))
        if augment is not None:
            samples = augment.wave(samples, rng)
        waves.append(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)))
    feats, lengths = front(waves, augment.warps(len(waves), rng) if augment is not None else None)
    if augment is not None:
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        feats = augment.spec(feats, lengths, generator=generator)
    tgts = [split.tgt(int(i)) for i in indices]
    ntok = int(sum(len(t) for t in tgts)) + len(indices)
    src_text = None
    if split.has_transcripts:
        rows = [split.transcript(int(i)) for i in indices]
        src_text = torch.full((len(rows), max(1, max(len(r) for r in rows))), PAD,
                              dtype=torch.long)  # (B, U)
        for b, row in enumerate(rows):
            src_text[b, : len(row)] = torch.from_numpy(row.astype(np.int64))
    return SpeechBatch(feats, lengths, *teacher_forcing(tgts), ntok, src_text)


def binarize_text_field(out: Path, manifests: dict[str, list[dict]], field: str, side: str, *,
                        vocab_size: int, spm_type: str = "unigram",
                        tokenizer: str = "sentencepiece", reuse: str | Path | None = None,
                        log=print):
    """Train a tokenizer (``spm.SIDE.model`` for SentencePiece) and a vocabulary (``SIDE.vocab``)
    on the train manifest's ``field``, and write every split's ids (``SPLIT.SIDE.tokens.npy``,
    ``.offsets.npy``); returns (tokenizer, vocab). ``reuse``: a prepared text data directory
    whose target tokenizer and vocabulary are copied instead of trained (so a decoder trained
    on that data fits this one token for token)."""
    from collections import Counter

    from encdec.data.prepare import _write_binarized
    from encdec.data.tokenizers import SentencePieceTokenizer, tokenizer_from_spec
    from encdec.data.vocab import Vocab

    if reuse is not None:
        tokenizer, vocab = reuse_target_tokens(reuse, out, side)
    elif tokenizer == "sentencepiece":
        tokenizer = SentencePieceTokenizer.train([e[field] for e in manifests["train"]],
                                                 out / f"spm.{side}", vocab_size, spm_type)
    else:
        tokenizer = tokenizer_from_spec({"kind": tokenizer}, out)
    pieces = {s: [tokenizer.encode(e[field]) for e in m] for s, m in manifests.items()}
    if reuse is None:
        vocab = Vocab.build(Counter(p for row in pieces["train"] for p in row))
        vocab.save(out / f"{side}.vocab")
    else:
        unknown = sum(p not in vocab.stoi for row in pieces["train"] for p in row)
        total = sum(len(row) for row in pieces["train"])
        log(f"{side}: tokenizer and vocabulary of {reuse} ({len(vocab)} tokens); "
            f"{unknown} of {total} training tokens not in it")
    for split, rows in pieces.items():
        _write_binarized(out, split, side, [vocab.encode(r) for r in rows])
    return tokenizer, vocab


def reuse_target_tokens(data_dir: str | Path, out: Path, side: str):
    """Copy the target tokenizer and vocabulary of the prepared text data directory ``data_dir``
    into ``out`` as ``spm.SIDE.model`` (SentencePiece) and ``SIDE.vocab``; returns (tokenizer,
    vocab) loaded from the copies."""
    import shutil

    from encdec.data.prepare import load_meta
    from encdec.data.tokenizers import tokenizer_from_spec
    from encdec.data.vocab import Vocab

    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    spec = dict(meta.get("tgt_tokenizer") or {})
    if meta.get("modality", "text") != "text" or not spec or not (data_dir / "tgt.vocab").exists():
        raise DataError(f"{data_dir}: not a prepared text data directory with a target "
                        "tokenizer and tgt.vocab (e.g. data/bible-en-es from "
                        "`encdec prepare bible-en-es`)")
    if spec.get("kind") == "sentencepiece":
        shutil.copyfile(data_dir / spec["model"], out / f"spm.{side}.model")
        spec["model"] = f"spm.{side}.model"
    elif spec.get("kind") == "phonemes":
        raise DataError(f"{data_dir}: its targets are phonemes; reuse a text data directory")
    shutil.copyfile(data_dir / "tgt.vocab", out / f"{side}.vocab")
    return tokenizer_from_spec(spec, out), Vocab.load(out / f"{side}.vocab")


def _has_transcripts(out: Path, manifests: dict[str, list[dict]]) -> bool:
    """Whether the utterances carry transcripts: all of them, or none (else DataError)."""
    have = [(s, e) for s, m in manifests.items() for e in m if e.get(TRANSCRIPT) is not None]
    total = sum(len(m) for m in manifests.values())
    if have and len(have) != total:
        split, entry = next((s, e) for s, m in manifests.items() for e in m
                            if e.get(TRANSCRIPT) is None)
        raise DataError(f"{out}: {split} utterance {entry.get('id', entry['audio'])!r} has no "
                        f"{TRANSCRIPT!r} while {len(have)} of {total} do: give every utterance "
                        "of every split a transcript, or none")
    return bool(have)


def finish_speech_dir(out: str | Path, manifests: dict[str, list[dict]], *, vocab_size: int = 256,
                      spm_type: str = "unigram", tokenizer: str = "sentencepiece",
                      metric: str = "asr", transcript_vocab_size: int = 256,
                      stats_from: str | Path | None = None, stats_utterances: int = 2000,
                      sample_rate: int = 16000, num_mel_bins: int = 80,
                      targets_from: str | Path | None = None, log=print) -> dict:
    """Target tokenizer and vocabulary (from the train manifest's "text", or copied from the text
    data directory ``targets_from``), target ids per split,
    and feature statistics (copied from ``stats_from``, or computed from up to
    ``stats_utterances`` train utterances spread over the split); returns the meta entries they
    add. Utterances with a "transcript" (speech translation) get its ids too, with a
    SentencePiece unigram tokenizer of ``transcript_vocab_size`` of their own."""
    import shutil

    out = Path(out)
    train = manifests.get("train") or []
    if not train:
        raise DataError(f"{out}: no training utterances")
    tokenizer, vocab = binarize_text_field(out, manifests, "text", "tgt", vocab_size=vocab_size,
                                           spm_type=spm_type, tokenizer=tokenizer,
                                           reuse=targets_from, log=log)
    targets = {"metric": metric, "feature_bins": num_mel_bins, "energy_floor": True,
               "src_tokenizer": None, "tgt_tokenizer": tokenizer.spec(), "src_vocab_size": 0,
               "tgt_vocab_size": len(vocab), "max_len": 0}
    log(f"targets: {len(vocab)} tokens ({tokenizer.kind})")
    if _has_transcripts(out, manifests):
        src_tokenizer, src_vocab = binarize_text_field(out, manifests, TRANSCRIPT, TRANSCRIPT,
                                                       vocab_size=transcript_vocab_size)
        targets.update(transcript_tokenizer=src_tokenizer.spec(),
                       transcript_vocab_size=len(src_vocab))
        log(f"transcripts: {len(src_vocab)} tokens ({src_tokenizer.kind})")
    if stats_from is not None:
        shutil.copyfile(stats_from, out / STATS_FILE)
        log(f"feature statistics copied from {stats_from}")
        return targets
    compute_feature_stats(out, train, sample_rate, num_mel_bins, stats_utterances, log)
    return targets


def compute_feature_stats(out: Path, train: list[dict], sample_rate: int, num_mel_bins: int,
                          utterances: int, log=print) -> FeatureStats:
    """Per-bin log-mel statistics of up to ``utterances`` train entries spread over the split,
    saved as ``out``/feats.stats.safetensors."""
    from encdec.audio.io import read_audio

    stats = FeatureStats(num_mel_bins)
    front = AudioFront(None, FbankOptions(sample_rate=sample_rate, num_mel_bins=num_mel_bins))
    step = max(1, len(train) // utterances)
    for entry in train[::step][:utterances]:
        feats, frames = front.log_mel_energies([read_audio(audio_file(out, entry["audio"]),
                                                           sample_rate)])
        stats.add(feats[0, : int(frames[0])])
    stats.save(out / STATS_FILE)
    log(f"feature statistics from {stats.count} frames")
    return stats


AUDIO_LIST_HELP = ("an audio list: a .tsv with lines AUDIO_PATH<TAB>TRANSCRIPT, or a .jsonl with "
                   'objects {"audio": PATH, "text": TRANSCRIPT} (optional "group", "voice"); '
                   "relative paths are read from the list's folder. Speech translation: the "
                   "target text, then the source-language transcript as a third column "
                   '(AUDIO_PATH<TAB>TRANSLATION<TAB>TRANSCRIPT) or a "transcript" field')


def is_audio_list(path: str | Path) -> bool:
    """Whether a --train file lists audio (first field an audio file name, or "audio" key)."""
    from encdec.transcribe import AUDIO_SUFFIXES

    try:
        with open(path, encoding="utf-8") as f:
            first = next((line for line in f if line.strip()), "")
    except (OSError, UnicodeDecodeError):
        return False
    if str(path).lower().endswith((".jsonl", ".json")):
        try:
            return "audio" in json.loads(first)
        except (ValueError, TypeError):
            return False
    return first.split("\t")[0].strip().lower().endswith(AUDIO_SUFFIXES)


def read_audio_list(path: str | Path) -> list[dict]:
    """Manifest entries (absolute audio path, duration, text, and "transcript" where the list
    gives one) of an audio list; a line whose audio is missing or unreadable stops with its file
    and line number."""
    import soundfile

    from encdec.data.corpus import read_lines

    path = Path(path)
    entries = []
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        if path.suffix.lower() in (".jsonl", ".json"):
            try:
                obj = json.loads(line)
                audio, text = obj["audio"], obj["text"]
                transcript = obj.get(TRANSCRIPT)
                if transcript is not None and not isinstance(transcript, str):
                    raise TypeError
            except (ValueError, KeyError, TypeError, AttributeError):
                raise DataError(f"{path}:{lineno}: expected an object with \"audio\" and "
                                "\"text\" (and optionally a \"transcript\" string)") from None
        else:
            fields = line.split("\t")
            if len(fields) not in (2, 3):
                raise DataError(f"{path}:{lineno}: expected AUDIO_PATH<TAB>TRANSCRIPT (or "
                                "AUDIO_PATH<TAB>TRANSLATION<TAB>TRANSCRIPT), found "
                                f"{len(fields)} fields")
            obj, audio, text = {}, fields[0], fields[1]
            transcript = fields[2] if len(fields) == 3 else None
        audio_path = Path(audio) if Path(audio).is_absolute() else path.parent / audio
        try:
            duration = soundfile.info(str(audio_path)).duration
        except (OSError, RuntimeError, soundfile.LibsndfileError) as err:
            raise DataError(f"{path}:{lineno}: cannot read audio {audio_path} ({err})") from None
        entry = {"id": f"{path.stem}-{lineno}", "audio": str(audio_path.resolve()),
                 "duration": round(duration, 3), "text": " ".join(str(text).split()),
                 "voice": obj.get("voice", ""), "group": obj.get("group", "all")}
        if transcript is not None:
            entry[TRANSCRIPT] = " ".join(transcript.split())
        entries.append(entry)
    return entries


def prepare_audio_list(out: str | Path, lists: dict[str, str], *, vocab_size: int = 256,
                       tokenizer: str = "sentencepiece", metric: str | None = None,
                       force: bool = False, log=print) -> dict:
    """A speech data directory from a user's audio lists (``lists``: split -> file; without
    dev and test, 5% each are split off train by a hash of the audio path). ``metric``: asr
    (WER/CER) or text (BLEU/chrF); by default text when the lists give transcripts (speech
    translation), else asr."""
    from encdec.data.prepare import check_replaceable, new_tmp_dir, swap_into_place
    from encdec.data.recipes import hash_split
    from encdec.files import atomic_write_text

    out = Path(out)
    check_replaceable(out, force)
    manifests = {split: read_audio_list(p) for split, p in lists.items()}
    if set(manifests) == {"train"}:
        split = {"train": [], "dev": [], "test": []}
        for e in manifests["train"]:
            split[hash_split(e["audio"])].append(e)
        manifests = split
    for split, entries in manifests.items():
        empty = [e for e in entries if not e["text"]]
        if empty:
            log(f"{split}: dropped {len(empty)} utterances with an empty text")
        manifests[split] = [e for e in entries if e["text"]]
        if not manifests[split]:
            raise DataError(f"no {split} utterances (give --dev and --test lists, or more "
                            "training audio)")
    tmp = new_tmp_dir(out)
    try:
        for split, entries in manifests.items():
            atomic_write_text(tmp / f"{split}.manifest.jsonl",
                              "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
        if metric is None:
            metric = "text" if any(TRANSCRIPT in e for e in manifests["train"]) else "asr"
        targets = finish_speech_dir(tmp, manifests, vocab_size=vocab_size, tokenizer=tokenizer,
                                    metric=metric, log=log)
        hours = {s: round(sum(e["duration"] for e in m) / 3600, 3) for s, m in manifests.items()}
        meta = {"format": 1, "name": "custom", "modality": "speech", "sample_rate": 16000,
                **targets, "hours": hours, "utterances": {s: len(m) for s, m in manifests.items()},
                "options": {"vocab_size": vocab_size, "tokenizer": tokenizer, "metric": metric}}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
        swap_into_place(tmp, out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for split, m in manifests.items():
        log(f"{split:>6}: {len(m):>6} utterances, {hours[split]:.2f} h")
    return meta
