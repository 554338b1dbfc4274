"""The Python API for speech runs (`encdec transcribe RUN FILE|DIR ...` is
``encdec.commands.transcribe``):

    tr = Transcriber.from_run("runs/asr-small")
    tr.transcribe(["a.wav", "b.flac"])                  # file paths
    tr.transcribe([(samples, 44100)])                    # arrays with their sample rate
    tr.transcribe(["a.wav"], method="ctc")               # CTC best path (the speech NAT)
    tr.transcribe(["a.wav"], beam_size=10, ctc_weight=0.3)  # joint CTC/attention beam

Any format libsndfile reads (WAV, FLAC, OGG, ...), any rate (resampled), several channels
(averaged). Audio longer than ``max_segment_s`` is decoded in segments cut at quiet points.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from encdec.audio.io import AudioError, check_samples, read_audio
from encdec.config import ConfigError
from encdec.decoding.audio import decode_audio
from encdec.decoding.texts import Translation
from encdec.translate import Translator

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au", ".w64")


class Transcriber(Translator):
    """A trained speech recognizer with its audio front, tokenizer and decoding defaults."""

    max_segment_s = 15.0  # longer audio is cut at quiet points (training audio is <= 12 s)

    @classmethod
    def from_run(cls, run_dir, checkpoint_name: str = "best", device: str = "cpu"):
        tr = super().from_run(run_dir, checkpoint_name, device)
        if not tr.assets.speech:
            raise ConfigError(f"{run_dir} is a text model: use encdec translate (or Translator)")
        return tr

    @property
    def sample_rate(self) -> int:
        return self.assets.audio_front.sample_rate

    def load(self, item, name: str = "<array>", warn=None) -> torch.Tensor:
        """One input as (N,) samples at the model's rate: a path, or (samples, sample_rate)."""
        if isinstance(item, (str, Path)):
            return read_audio(item, self.sample_rate, warn=warn) if warn else \
                read_audio(item, self.sample_rate)
        if isinstance(item, tuple) and len(item) == 2:
            samples, rate = item
            samples = samples.numpy() if isinstance(samples, torch.Tensor) else np.asarray(samples)
            if samples.ndim == 2:  # (N, channels) or (channels, N): mix to mono
                samples = samples.mean(axis=1 if samples.shape[0] > samples.shape[1] else 0)
            return check_samples(samples, int(rate), self.sample_rate, name)
        raise AudioError(f"{name}: expected a file path or a (samples, sample_rate) pair, got "
                         f"{type(item).__name__}")

    def transcribe_nbest(self, inputs: list, need_attention: bool = False, progress=None,
                         warn=None, **decode_overrides) -> list[list[Translation]]:
        cfg = self.decode_config(**decode_overrides)
        waves = [self.load(x, x if isinstance(x, (str, Path)) else f"input {i}")
                 for i, x in enumerate(inputs)]
        return decode_audio(self.model, waves, cfg=cfg, device=self.device,
                            need_attention=need_attention, max_segment_s=self.max_segment_s,
                            progress=progress, warn=warn, **self.assets.audio_kwargs())

    def transcribe(self, inputs: list, **decode_overrides) -> list[str]:
        """The best transcript of each input, in input order."""
        return [n[0].text for n in self.transcribe_nbest(inputs, **decode_overrides)]
