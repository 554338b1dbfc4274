"""Text to speech with a trained TTS run: text -> input tokens -> mel frames -> audio.

    from encdec.speak import Speaker
    speaker = Speaker.from_run("runs/tts-nat")
    [speech] = speaker.speak(["In the beginning God created the heaven and the earth."],
                             length_scale=1.2)          # 20 % slower
    speech.audio, speech.sample_rate, speech.durations   # float32 samples, 16000, frames/token

``length_scale`` multiplies every predicted duration (FastSpeech runs); ``token_scales``
gives one factor per input token (``Speaker.tokens(text)`` lists them) for per-phone control.
Autoregressive runs (transformer_tts, tacotron2) stop on their stop head or at
``max_seconds``; their durations are read off the attention. The vocoder is Griffin-Lim
(``encdec.audio.vocoder``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from encdec.config import Config, ConfigError
from encdec.data.vocab import PAD, UNK


class SpeakError(ValueError):
    """Text a TTS run cannot speak; ``index`` is the input's position in the request, when one
    input is at fault, and the message says why."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message if index is None else f"input {index}: {message}")
        self.index = index
        self.reason = message


class SpeechTooLong(SpeakError):
    """The speech for an input would be longer than the ``max_seconds`` asked for."""


@dataclass
class Speech:
    audio: np.ndarray  # (N,) float32 samples in [-1, 1]
    sample_rate: int
    mels: np.ndarray  # (T, M) log-mel frames (not normalized) the audio was made from
    tokens: list[str]  # the input tokens (phonemes or characters)
    durations: list[int]  # frames per token (10 ms each)

    @property
    def seconds(self) -> float:
        return len(self.audio) / self.sample_rate


class Speaker:
    def __init__(self, model, assets, cfg: Config, device: torch.device, checkpoint_dir: Path):
        self.model = model.eval()
        self.assets = assets
        self.cfg = cfg
        self.device = device
        self.checkpoint_dir = checkpoint_dir
        from encdec.models import AUTOREGRESSIVE_TTS

        self.autoregressive = cfg.model.arch in AUTOREGRESSIVE_TTS

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint_name: str = "best",
                 device: str = "cpu") -> "Speaker":
        from encdec import checkpoint
        from encdec.data.assets import load_assets
        from encdec.models import model_for_data
        from encdec.translate import inference_device

        run_dir = Path(run_dir)
        if not (run_dir / "config.yaml").exists():
            raise checkpoint.CheckpointError(f"{run_dir}: not a run directory (no config.yaml)")
        cfg = Config.load(run_dir / "config.yaml")
        assets = load_assets(run_dir / "data")
        if not assets.tts:
            raise ConfigError(f"{run_dir} is not a text-to-speech run (its data is "
                              f"{assets.meta.get('name', '?')}); speak needs a run trained on "
                              "encdec prepare bible-tts data")
        model = model_for_data(cfg.model, assets.meta)
        ckpt = checkpoint.resolve(run_dir, checkpoint_name)
        checkpoint.load_weights(model, ckpt)
        dev = inference_device(device)
        return cls(model.to(dev), assets, cfg, dev, ckpt)

    @property
    def sample_rate(self) -> int:
        return self.assets.audio_front.sample_rate

    def tokens(self, text: str) -> list[str]:
        """The input tokens ``text`` becomes (what ``token_scales`` are given per)."""
        return self.assets.src_tokenizer.encode(text)

    def input_ids(self, text: str, index: int | None = None) -> list[int]:
        """The token ids ``text`` is spoken from; SpeakError for text this run cannot speak
        (empty, no words, symbols it never saw in training)."""
        return self._ids(index, text)

    def _ids(self, index: int | None, text: str) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise SpeakError("empty text, nothing to speak", index)
        tokens = self.tokens(text)
        ids = self.assets.src_vocab.encode(tokens)
        unknown = sorted({t for t, i in zip(tokens, ids) if i == UNK})
        if unknown:
            raise SpeakError("symbols this run never saw in training: "
                             f"{' '.join(unknown[:20])}", index)
        if not ids:
            raise SpeakError(f"{text[:40]!r} has nothing to speak (no words)", index)
        return ids

    @torch.no_grad()
    def mels(self, texts: list[str], length_scale: float = 1.0,
             token_scales: list[list[float]] | None = None, max_seconds: float = 30.0):
        """Normalized mel frames (B, T, M), frame counts (B,), token ids and durations (B, N)."""
        if not length_scale > 0:
            raise SpeakError(f"length_scale must be positive, not {length_scale}")
        rows = [self._ids(i, t) for i, t in enumerate(texts)]
        tokens = torch.full((len(rows), max(len(r) for r in rows)), PAD, dtype=torch.long)
        for b, row in enumerate(rows):
            tokens[b, : len(row)] = torch.tensor(row)
        tokens = tokens.to(self.device)
        max_frames = int(max_seconds * 100)
        if self.autoregressive:
            if length_scale != 1.0 or token_scales is not None:
                raise SpeakError("length_scale and token_scales need a non-autoregressive "
                                 f"(fastspeech) run; this one is {self.cfg.model.arch}")
            out = self.model.synthesize(tokens, max_frames=max_frames)
        else:
            scales = None
            if token_scales is not None:
                scales = torch.ones(tokens.shape)
                for b, (row, given) in enumerate(zip(rows, token_scales)):
                    if len(given) != len(row):
                        raise SpeakError(f"{len(given)} token_scales for {len(row)} tokens "
                                         f"({' '.join(self.tokens(texts[b]))})", b)
                    scales[b, : len(row)] = torch.tensor(given, dtype=torch.float32)
                scales = scales.to(self.device)
            out = self.model.synthesize(tokens, length_scale=length_scale, token_scales=scales)
            too_long = out.frame_lengths > max_frames
            if bool(too_long.any()):
                b = int(too_long.nonzero()[0])
                raise SpeechTooLong(f"{int(out.frame_lengths[b]) / 100:.1f} s of speech, over the "
                                 f"{max_seconds:g} s limit; split the text", b)
        return out, rows

    def speak(self, texts: list[str], length_scale: float = 1.0,
              token_scales: list[list[float]] | None = None, max_seconds: float = 30.0,
              vocoder_iterations: int = 32) -> list[Speech]:
        from encdec.audio.vocoder import vocode

        out, rows = self.mels(texts, length_scale, token_scales, max_seconds)
        stats = self.assets.audio_front.stats
        log_mel = out.mels.float().cpu() * stats.std + stats.mean  # undo the normalization
        lengths = out.frame_lengths.cpu()
        shift = self.assets.audio_front.opts.frame_shift
        result = []
        for b, row in enumerate(rows):
            n = int(lengths[b])
            # one row at a time: a text's audio does not depend on what it was batched with
            wave = vocode(log_mel[b:b + 1, :n], self.assets.audio_front.opts, vocoder_iterations)
            result.append(Speech(
                audio=wave[0, : n * shift].numpy().astype(np.float32), sample_rate=self.sample_rate,
                mels=log_mel[b, :n].numpy(), tokens=self.assets.src_vocab.decode(row),
                durations=[int(d) for d in out.durations[b, : len(row)].tolist()]))
        return result
