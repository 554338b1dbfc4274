"""`encdec export`: a trained Transformer run as a CTranslate2 model.

The model is described with CTranslate2's own Python specification (``TransformerSpec``) and
written by its converter, so CTranslate2 runs our network as it is: fused QKV and KV
projections, pre- or post-LN sublayers, LayerNorm or RMSNorm, embeddings scaled by
sqrt(d_model), our position table (sinusoids or learned), tied or separate output layer. The
export directory is self-contained:

    DIR/model.bin, config.json, *vocabulary.json    CTranslate2's model and vocabularies
    DIR/meta.json, src.vocab, tgt.vocab, spm.*       encdec's tokenizers and vocabularies
    DIR/encdec_export.json                           source run, checkpoint, quantization, ...

Decoding with an export is ``Translator.from_run(RUN, engine="ctranslate2")``
(``encdec.decoding.ctranslate2``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from pathlib import Path

import torch

from encdec import __version__, checkpoint
from encdec.config import Config, ConfigError
from encdec.data.assets import copy_assets, load_assets
from encdec.data.prepare import new_tmp_dir, swap_into_place
from encdec.data.vocab import SPECIALS
from encdec.decoding.ctranslate2 import import_ctranslate2
from encdec.files import write_error
from encdec.models import model_for_data

QUANTIZATIONS = ("int8", "int8_float32", "float16")
INFO_FILE = "encdec_export.json"
DEFAULT_DIR = Path("export") / "ctranslate2"  # inside the run directory

# Why each architecture other than the Transformer cannot be exported.
_REFUSED = {
    "nat": "a non-autoregressive model predicts the output length and fills all positions at "
           "once (Mask-Predict refinement); CTranslate2 only decodes left to right",
    "lstm": "a recurrent (LSTM) encoder-decoder; CTranslate2's sequence-to-sequence models are "
            "Transformers",
    "gru": "a recurrent (GRU) encoder-decoder; CTranslate2's sequence-to-sequence models are "
           "Transformers",
    "speech": "a speech model reads log-mel frames through a convolutional front end (and "
              "possibly a CTC head), which CTranslate2's Transformer translator cannot express; "
              "it takes token ids",
}


def check_exportable(cfg: Config, run_dir: str | Path = "the run") -> None:
    """Raise ConfigError, naming the setting and why, unless CTranslate2 can run the model
    exactly as encdec does."""
    m = cfg.model
    if m.arch != "transformer":
        why = _REFUSED.get(m.arch, "only model.arch=transformer can be exported")
        raise ConfigError(f"{run_dir}: model.arch={m.arch!r} cannot be exported to "
                          f"CTranslate2: {why}")
    if m.norm_type == "batchnorm":
        raise ConfigError(f"{run_dir}: model.norm_type='batchnorm' cannot be exported to "
                          "CTranslate2: its Transformer normalizes with LayerNorm or RMSNorm, "
                          "and nothing in it applies BatchNorm's per-feature running statistics")


def export_ctranslate2(run_dir: str | Path, out_dir: str | Path | None = None,
                       quantization: str | None = None, checkpoint_name: str = "best") -> Path:
    """Write the run's ``checkpoint_name`` weights as a CTranslate2 model in ``out_dir``
    (default RUN/export/ctranslate2) with weights in ``quantization`` (None: float32).

    An earlier export in ``out_dir`` is replaced; any other non-empty directory is refused.
    The new export appears at once when complete (it is built beside ``out_dir``)."""
    run_dir = Path(run_dir)
    if quantization is not None and quantization not in QUANTIZATIONS:
        raise ConfigError(f"quantization {quantization!r}: choose one of "
                          f"{', '.join(QUANTIZATIONS)} (or none for float32)")
    if not (run_dir / "config.yaml").exists():
        raise checkpoint.CheckpointError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = Config.load(run_dir / "config.yaml")
    check_exportable(cfg, run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir / DEFAULT_DIR
    _check_replaceable(out)
    ckpt = checkpoint.resolve(run_dir, checkpoint_name)
    assets = load_assets(run_dir / "data")
    model = model_for_data(cfg.model, assets.meta)
    checkpoint.load_weights(model, ckpt)
    model.eval()
    max_src = int(assets.meta.get("max_len") or cfg.train.max_len)
    positions = position_rows(cfg, max_src)

    ctranslate2 = import_ctranslate2()

    class RunConverter(ctranslate2.converters.Converter):
        def _load(self):
            return transformer_spec(model, cfg, assets.src_vocab.itos, assets.tgt_vocab.itos,
                                    positions)

    tmp = None
    try:
        tmp = new_tmp_dir(out)
        RunConverter().convert(str(tmp), quantization=quantization, force=True)
        copy_assets(run_dir / "data", tmp)
        info = {
            "format": "ctranslate2", "source_run": str(run_dir.resolve()),
            "checkpoint": ckpt.name, "checkpoint_sha256": weights_digest(ckpt),
            "quantization": quantization or "float32", "positions": positions,
            "encdec_version": __version__, "ctranslate2_version": ctranslate2.__version__,
            "model": dataclasses.asdict(cfg.model), "decode": dataclasses.asdict(cfg.decode),
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        swap_into_place(tmp, out)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # a full disk, say: where, why, and the space left
            raise checkpoint.CheckpointError(write_error("the export", out, err)) from None
        raise
    return out


def _check_replaceable(out: Path) -> None:
    """A mistyped --out must not delete a user's directory: only an earlier export (or an
    empty directory) is replaced."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out} is a file; choose a directory to export into (--out)")
    if any(out.iterdir()) and not (out / INFO_FILE).exists():
        raise ConfigError(f"{out} exists and is not an encdec export (no {INFO_FILE}); it "
                          "would be replaced. Choose another --out, or remove it first")


def weights_digest(ckpt_dir: Path) -> str:
    """SHA-256 of a checkpoint's weights: tells whether an export is of these weights."""
    digest = hashlib.sha256()
    with open(ckpt_dir / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def position_rows(cfg: Config, max_src_tokens: int) -> int:
    """Rows of the exported position table. Learned positions: the model's own table.
    Sinusoids extend to any length in encdec but are a fixed table in the export: enough for
    the longest input the run decodes (``max_src_tokens``) and the longest output its
    decoding settings allow for it, a * S + b tokens, plus the forced </s> step."""
    m, d = cfg.model, cfg.decode
    if m.positions == "learned":
        return m.max_positions
    longest_out = math.floor(d.max_len_a * max_src_tokens + d.max_len_b)
    return max(m.max_positions, max_src_tokens, longest_out)


def _array(t: torch.Tensor):
    return t.detach().to(torch.float32).cpu().numpy()


def _positions(embed, rows: int):
    """The (rows, d) position table an Embedding adds: CTranslate2 adds row ``step`` to the
    scaled token embedding at position ``step``, starting at 0, as encdec does. (Its built-in
    sinusoids differ: sin and cos halves concatenated, positions counted from 1.)"""
    return _array(embed.positions(rows))  # sinusoids: our interleaved sin/cos layout


def _linear(spec, linear) -> None:
    spec.weight = _array(linear.weight)  # (out, in), as CTranslate2 stores it
    if linear.bias is not None:
        spec.bias = _array(linear.bias)


def _norm(spec, norm) -> None:
    spec.gamma = _array(norm.weight)
    if getattr(norm, "bias", None) is not None:  # RMSNorm has none
        spec.beta = _array(norm.bias)


def norm_epsilon(model) -> float:
    norm = model.encoder[0].attn_sub.norm
    if norm.eps is not None:
        return float(norm.eps)
    return float(torch.finfo(torch.float32).eps)  # nn.RMSNorm(eps=None) uses the dtype's eps


def transformer_spec(model, cfg: Config, src_tokens: list[str], tgt_tokens: list[str],
                     positions: int):
    """A ``ctranslate2.specs.TransformerSpec`` holding ``model``'s weights (a
    ``TransformerSeq2Seq``) and vocabularies, configured like ``cfg.model``."""
    from ctranslate2.specs import common_spec, transformer_spec as ts

    m = cfg.model
    pre = m.norm == "pre"
    rms = m.norm_type == "rmsnorm"
    activation = {"relu": common_spec.Activation.RELU,
                  "gelu": common_spec.Activation.GELU}[m.activation]  # exact (erf) GELU
    encoder = ts.TransformerEncoderSpec(m.enc_layers, m.n_heads, pre_norm=pre,
                                        activation=activation, rms_norm=rms)
    decoder = ts.TransformerDecoderSpec(m.dec_layers, m.n_heads, pre_norm=pre,
                                        activation=activation, rms_norm=rms)

    # Embeddings: token vectors * sqrt(d_model) + position row; scale_embeddings=True is
    # CTranslate2's flag for that sqrt(d_model) factor.
    encoder.embeddings[0].weight = _array(model.src_embed.tokens.weight)
    encoder.scale_embeddings = True
    encoder.position_encodings.encodings = _positions(model.src_embed, positions)
    decoder.embeddings.weight = _array(model.tgt_embed.tokens.weight)
    decoder.scale_embeddings = True
    decoder.position_encodings.encodings = _positions(model.tgt_embed, positions)

    for spec, layer in zip(encoder.layer, model.encoder):
        _linear(spec.self_attention.linear[0], layer.self_attn.qkv_proj)  # fused Q, K, V
        _linear(spec.self_attention.linear[1], layer.self_attn.out_proj)
        _norm(spec.self_attention.layer_norm, layer.attn_sub.norm)
        _feed_forward(spec.ffn, layer.ffn, layer.ffn_sub.norm)
    for spec, layer in zip(decoder.layer, model.decoder):
        _linear(spec.self_attention.linear[0], layer.self_attn.qkv_proj)
        _linear(spec.self_attention.linear[1], layer.self_attn.out_proj)
        _norm(spec.self_attention.layer_norm, layer.self_sub.norm)
        _linear(spec.attention.linear[0], layer.cross_attn.q_proj)
        _linear(spec.attention.linear[1], layer.cross_attn.kv_proj)  # fused K, V of memory
        _linear(spec.attention.linear[2], layer.cross_attn.out_proj)
        _norm(spec.attention.layer_norm, layer.cross_sub.norm)
        _feed_forward(spec.ffn, layer.ffn, layer.ffn_sub.norm)
    if pre:  # pre-LN stacks end with a norm; post-LN ones have none (the spec has no slot)
        _norm(encoder.layer_norm, model.enc_norm)
        _norm(decoder.layer_norm, model.dec_norm)
    _linear(decoder.projection, model.output)  # the tied embedding, or its own matrix

    spec = ts.TransformerSpec(encoder, decoder)
    spec.config.layer_norm_epsilon = norm_epsilon(model)
    # encdec's special symbols (encdec.data.vocab): decoding starts from <s>, ends at </s>;
    # the source gets neither.
    _, bos, eos, unk = SPECIALS  # <pad>, <s>, </s>, <unk>
    spec.config.bos_token = bos
    spec.config.decoder_start_token = bos
    spec.config.eos_token = eos
    spec.config.unk_token = unk
    spec.config.add_source_bos = False
    spec.config.add_source_eos = False
    spec.register_source_vocabulary(list(src_tokens))
    spec.register_target_vocabulary(list(tgt_tokens))
    return spec


def _feed_forward(spec, ffn, norm) -> None:
    _linear(spec.linear_0, ffn.fc1)
    _linear(spec.linear_1, ffn.fc2)
    _norm(spec.layer_norm, norm)


def ensure_export(run_dir: str | Path, ckpt: Path, export_dir: str | Path | None = None) -> Path:
    """The export to decode the checkpoint ``ckpt`` with. A given ``export_dir`` is used as it
    is and must hold these weights; the default, RUN/export/ctranslate2, is written when it is
    missing or holds other weights (training went on), in the quantization it had."""
    run_dir = Path(run_dir)
    digest = weights_digest(ckpt)
    if export_dir is not None:
        info = read_info(export_dir)
        if info.get("checkpoint_sha256") != digest:
            raise ConfigError(
                f"{export_dir} holds the weights of {info.get('source_run')} checkpoint "
                f"{info.get('checkpoint')}, not those of {ckpt}: export it again (encdec export "
                f"{run_dir} --checkpoint {ckpt.name} --out {export_dir})")
        return Path(export_dir)
    out = run_dir / DEFAULT_DIR
    quantization = None
    if (out / INFO_FILE).exists():
        info = read_info(out)
        if info.get("checkpoint_sha256") == digest:
            return out
        quantization = info.get("quantization")
    return export_ctranslate2(run_dir, out, None if quantization == "float32" else quantization,
                              checkpoint_name=ckpt.name)


def read_info(export_dir: str | Path) -> dict:
    path = Path(export_dir) / INFO_FILE
    if not path.exists():
        raise ConfigError(f"{export_dir}: not an encdec export (no {INFO_FILE}); make one with "
                          "encdec export RUN --format ctranslate2 --out DIR")
    return json.loads(path.read_text(encoding="utf-8"))
