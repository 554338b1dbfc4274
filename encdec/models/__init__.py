"""Model families by name. Each builder takes (ModelConfig, source size, tgt_vocab_size): the
source size is the source vocabulary for text models and the feature bins per frame for
speech models (``model_for_data`` picks the right one from a data directory's meta)."""

from encdec.models.nat import NATransformer
from encdec.models.recurrent import RecurrentSeq2Seq
from encdec.models.speech import SpeechTransformer
from encdec.models.transformer import TransformerSeq2Seq

MODELS = {"transformer": TransformerSeq2Seq, "nat": NATransformer, "lstm": RecurrentSeq2Seq,
          "gru": RecurrentSeq2Seq, "speech": SpeechTransformer}


def build_model(cfg, src_vocab_size: int, tgt_vocab_size: int):
    if cfg.arch not in MODELS:
        from encdec.config import ConfigError

        raise ConfigError(f"model.arch={cfg.arch!r}: choose one of {', '.join(MODELS)}")
    return MODELS[cfg.arch](cfg, src_vocab_size, tgt_vocab_size)


def model_for_data(cfg, meta: dict):
    """The model of ``cfg`` sized for the data described by ``meta`` (a data directory's)."""
    from encdec.config import ConfigError

    speech_data = meta.get("modality") == "speech"
    if speech_data != (cfg.arch == "speech"):
        what = "speech (audio inputs)" if speech_data else "text (token inputs)"
        raise ConfigError(f"model.arch={cfg.arch!r} does not fit {meta.get('name', 'the data')}, "
                          f"which is {what}: use model.arch=speech for audio inputs and "
                          "transformer, nat, lstm or gru for text")
    src_size = meta["feature_bins"] if speech_data else meta["src_vocab_size"]
    return build_model(cfg, src_size, meta["tgt_vocab_size"])
