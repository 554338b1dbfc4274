"""Model families by name. Each builder takes (ModelConfig, source size, tgt_vocab_size): the
source size is the source vocabulary for text models and the feature bins per frame for
speech models (``model_for_data`` picks the right one from a data directory's meta). Speech
models also take ``transcript_vocab_size`` (the auxiliary CTC head's vocabulary; 0 = none)."""

from encdec.models.nat import NATransformer
from encdec.models.recurrent import RecurrentSeq2Seq
from encdec.models.speech import SpeechTransformer
from encdec.models.transformer import TransformerSeq2Seq
from encdec.models.tacotron import Tacotron2
from encdec.models.tts import FastSpeech, TransformerTTS

MODELS = {"transformer": TransformerSeq2Seq, "nat": NATransformer, "lstm": RecurrentSeq2Seq,
          "gru": RecurrentSeq2Seq, "speech": SpeechTransformer, "fastspeech": FastSpeech,
          "transformer_tts": TransformerTTS, "tacotron2": Tacotron2}
AUTOREGRESSIVE_TTS = ("transformer_tts", "tacotron2")  # step by step, until the stop head says
TTS_MODELS = ("fastspeech",) + AUTOREGRESSIVE_TTS


def build_model(cfg, src_vocab_size: int, tgt_vocab_size: int, **sizes):
    if cfg.arch not in MODELS:
        from encdec.config import ConfigError

        raise ConfigError(f"model.arch={cfg.arch!r}: choose one of {', '.join(MODELS)}")
    return MODELS[cfg.arch](cfg, src_vocab_size, tgt_vocab_size, **sizes)


def model_for_data(cfg, meta: dict):
    """The model of ``cfg`` sized for the data described by ``meta`` (a data directory's)."""
    from encdec.config import ConfigError

    if meta.get("modality") == "tts" or cfg.arch in TTS_MODELS:
        if meta.get("modality") != "tts" or cfg.arch not in TTS_MODELS:
            raise ConfigError(f"model.arch={cfg.arch!r} does not fit {meta.get('name', 'the data')}"
                              ": text-to-speech data (encdec prepare bible-tts) takes model.arch="
                              f"{', '.join(TTS_MODELS)}, and those take only such data")
        if cfg.arch == "fastspeech":
            return FastSpeech(cfg, meta["src_vocab_size"], meta["feature_bins"],
                              postnet_layers=cfg.tts_postnet_layers)
        return MODELS[cfg.arch](cfg, meta["src_vocab_size"], meta["feature_bins"],
                                reduction=cfg.tts_reduction, postnet_layers=cfg.tts_postnet_layers)
    speech_data = meta.get("modality") == "speech"
    if speech_data != (cfg.arch == "speech"):
        what = "speech (audio inputs)" if speech_data else "text (token inputs)"
        raise ConfigError(f"model.arch={cfg.arch!r} does not fit {meta.get('name', 'the data')}, "
                          f"which is {what}: use model.arch=speech for audio inputs and "
                          "transformer, nat, lstm or gru for text")
    if not speech_data:
        return build_model(cfg, meta["src_vocab_size"], meta["tgt_vocab_size"])
    if cfg.aux_ctc_weight > 0 and not meta.get("transcript_vocab_size"):
        raise ConfigError(f"model.aux_ctc_weight={cfg.aux_ctc_weight} needs source-language "
                          f"transcripts, and {meta.get('name', 'the data')} has none (no "
                          "transcript_vocab_size in its meta.json): prepare speech translation "
                          "data (encdec prepare bible-speech-es, or an audio list with a "
                          "transcript field), or set model.aux_ctc_weight=0")
    return build_model(cfg, meta["feature_bins"], meta["tgt_vocab_size"],
                       transcript_vocab_size=meta.get("transcript_vocab_size", 0))
