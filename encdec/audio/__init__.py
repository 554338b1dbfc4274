"""Audio for the speech front ends: reading and resampling, Kaldi-compatible log-mel features,
global normalization statistics and SpecAugment. No model code lives here."""

from encdec.audio.features import FbankOptions, LogMel, num_frames
from encdec.audio.io import AudioError, check_samples, clipping_fraction, read_audio
from encdec.audio.io import read_audio_bytes, split_long
from encdec.audio.normalize import FeatureStats
from encdec.audio.specaugment import SpecAugment

__all__ = ["AudioError", "FbankOptions", "FeatureStats", "LogMel", "SpecAugment", "check_samples",
           "clipping_fraction", "num_frames", "read_audio", "read_audio_bytes", "split_long"]
