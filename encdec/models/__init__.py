"""Model families by name. Each builder takes (ModelConfig, src_vocab_size, tgt_vocab_size)."""

from encdec.models.nat import NATransformer
from encdec.models.recurrent import RecurrentSeq2Seq
from encdec.models.transformer import TransformerSeq2Seq

MODELS = {"transformer": TransformerSeq2Seq, "nat": NATransformer, "lstm": RecurrentSeq2Seq,
          "gru": RecurrentSeq2Seq}


def build_model(cfg, src_vocab_size: int, tgt_vocab_size: int):
    if cfg.arch not in MODELS:
        from encdec.config import ConfigError

        raise ConfigError(f"model.arch={cfg.arch!r}: choose one of {', '.join(MODELS)}")
    return MODELS[cfg.arch](cfg, src_vocab_size, tgt_vocab_size)
