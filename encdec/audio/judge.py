"""An independent recognizer: PyPI ``pocketsphinx`` 5.x with its bundled US-English model.

It is the peer of encdec's speech recognizer (``benchmarks/asr_peer.py``) and the judge of
its speech synthesis (``encdec evaluate`` on a TTS run): round-trip WER/CER of synthesized
speech against the text it was made from, a measure of intelligibility nobody trained for.
Default configuration (the bundled acoustic model, trigram LM and dictionary), offline.

Transcripts and references are scored the same way: ``normalize_transcript`` (lowercase words,
apostrophes kept) and ``SPOKEN_FORMS``.
"""

from __future__ import annotations

import importlib.metadata

import numpy as np

SAMPLE_RATE = 16000  # the bundled en-us acoustic model's rate
# PocketSphinx's LM writes some words as abbreviations that its dictionary pronounces exactly as
# the spelled-out word (mr = mister = M IH S T ER; mrs = missus = M IH S IH Z), where our
# transcripts spell them out: counted as errors, they would be spelling, not recognition.
SPOKEN_FORMS = {"mr": "mister", "mrs": "missus"}


def judge_text(text: str) -> str:
    """A transcript or reference as scored: normalized words, abbreviations spelled out."""
    from encdec.data.speech import normalize_transcript

    return " ".join(SPOKEN_FORMS.get(w, w) for w in normalize_transcript(text).split())


class Judge:
    """PocketSphinx's default en-us decoder, created once; one utterance at a time."""

    def __init__(self):
        try:
            from pocketsphinx import Decoder
        except ImportError as err:
            raise RuntimeError("the judge needs PyPI pocketsphinx 5.x (`make setup` installs "
                               "it)") from err
        self.decoder = Decoder(loglevel="FATAL")
        if int(self.decoder.config["samprate"]) != SAMPLE_RATE:
            raise RuntimeError(f"pocketsphinx expects {self.decoder.config['samprate']} Hz audio")
        self.name = f"pocketsphinx {importlib.metadata.version('pocketsphinx')}"

    def transcribe(self, waves: list[np.ndarray], sample_rate: int = SAMPLE_RATE) -> list[str]:
        """Raw transcripts of mono float waveforms in [-1, 1]."""
        from encdec.audio.io import resample

        texts = []
        for wave in waves:
            wave = np.asarray(wave, dtype=np.float32)
            if sample_rate != SAMPLE_RATE:
                wave = resample(wave, sample_rate, SAMPLE_RATE)
            # soundfile reads 16-bit audio as int / 32768: this gives back the exact samples
            pcm = np.clip(np.round(wave * 32768.0), -32768, 32767).astype("<i2").tobytes()
            # The front end carries its noise estimate from one utterance to the next, which
            # changed words of the next utterance in a test; reset it (0.25 ms) so every
            # transcript is independent of the order and of how many came before.
            self.decoder.reinit_feat()
            self.decoder.start_utt()
            self.decoder.process_raw(pcm, full_utt=True)  # whole utterance: batch CMN, not live
            self.decoder.end_utt()
            hyp = self.decoder.hyp()  # None when nothing was recognized
            texts.append(hyp.hypstr if hyp is not None else "")
        return texts
