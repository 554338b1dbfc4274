"""fairseq as a training-speed peer: install, data conversion, and the same model's arguments.

Used by ``benchmarks/train_speed.py --peer fairseq``; runs in encdec's environment and starts
fairseq's tools in fairseq's own (``setup_fairseq.sh``).

- ``install()``: the peer's python (fairseq 0.12 from PyPI ``fairseq-fixed``, the torch that
  encdec pins, in ``$ENCDEC_PEERS/fairseq``, default ``~/.cache/encdec-peers/fairseq``).
- ``convert(data_dir)``: the train split of an encdec data directory in fairseq's binarized
  format, written by ``fairseq-preprocess`` from the token ids (one symbol per encdec id, so
  ids, vocabulary sizes and pair order are the same; cached by the directory's contents).
- ``train_args(cfg)``: fairseq-train arguments for the encdec config's model and optimization.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from encdec.config import Config
from encdec.data.dataset import BinarizedSplit
from encdec.data.prepare import load_meta
from encdec.data.vocab import SPECIALS, UNK

HERE = Path(__file__).resolve().parent
PEERS = Path(os.environ.get("ENCDEC_PEERS", Path.home() / ".cache" / "encdec-peers"))
DRIVER = HERE / "fairseq_train.py"


def install() -> str:
    """Path of fairseq's python, installing it first when needed (several minutes, once)."""
    out = subprocess.run([str(HERE / "setup_fairseq.sh"), str(PEERS / "fairseq")],
                         stdout=subprocess.PIPE, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def _symbol(i: int) -> str:
    # fairseq numbers its own specials <s>=0 <pad>=1 </s>=2 <unk>=3 and then the dictionary file
    # in order: writing encdec's ids 4.. in order keeps every ordinary token's id.
    return "<unk>" if i == UNK else str(i)


def convert(data_dir: str | Path, python: str) -> Path:
    """fairseq-preprocess'd copy of the train split of ``data_dir`` (cached)."""
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    digest = hashlib.sha1()
    for name in ("meta.json", "train.src.offsets.npy", "train.tgt.offsets.npy"):
        digest.update((data_dir / name).read_bytes())
    out = PEERS / "fairseq-data" / f"{data_dir.name}-{digest.hexdigest()[:10]}"
    if (out / "done").exists():
        return out
    text = out / "text"
    text.mkdir(parents=True, exist_ok=True)
    split = BinarizedSplit(data_dir, "train")
    for side, tokens, offsets in (("src", split.src_tokens, split.src_offsets),
                                  ("tgt", split.tgt_tokens, split.tgt_offsets)):
        ids = np.asarray(tokens)
        with open(text / f"train.{side}", "w", encoding="utf-8") as f:
            for a, b in zip(offsets[:-1], offsets[1:]):
                f.write(" ".join(_symbol(int(i)) for i in ids[a:b]) + "\n")
        size = meta[f"{side}_vocab_size"]
        with open(text / f"dict.{side}.txt", "w", encoding="utf-8") as f:
            f.writelines(f"{i} 1\n" for i in range(len(SPECIALS), size))
    joined = bool(meta.get("joint_vocab"))
    cmd = [str(Path(python).parent / "fairseq-preprocess"), "--source-lang", "src",
           "--target-lang", "tgt", "--trainpref", str(text / "train"), "--destdir", str(out),
           "--srcdict", str(text / "dict.src.txt"), "--padding-factor", "1", "--workers", "2"]
    cmd += ["--joined-dictionary"] if joined else ["--tgtdict", str(text / "dict.tgt.txt")]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    (out / "done").write_text("")
    return out


def train_args(cfg: Config) -> list[str]:
    """fairseq-train arguments for the same model size, regularization and optimization."""
    m, t = cfg.model, cfg.train
    if m.arch != "transformer" or m.positions != "sinusoidal" or m.norm_type != "layernorm":
        sys.exit("the fairseq peer covers Transformer configs with sinusoidal positions and "
                 "LayerNorm")
    args = ["--task", "translation", "--source-lang", "src", "--target-lang", "tgt",
            "--arch", "transformer", "--cpu", "--seed", str(t.seed),
            "--encoder-layers", str(m.enc_layers), "--decoder-layers", str(m.dec_layers),
            "--encoder-embed-dim", str(m.d_model), "--decoder-embed-dim", str(m.d_model),
            "--encoder-ffn-embed-dim", str(m.ffn_dim), "--decoder-ffn-embed-dim", str(m.ffn_dim),
            "--encoder-attention-heads", str(m.n_heads), "--decoder-attention-heads", str(m.n_heads),
            "--activation-fn", m.activation, "--dropout", str(m.dropout),
            "--attention-dropout", str(m.attention_dropout),
            "--activation-dropout", str(m.activation_dropout),
            "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", str(t.label_smoothing),
            "--optimizer", "adam", "--adam-betas", str(tuple(t.betas)), "--adam-eps", str(t.eps),
            "--weight-decay", str(t.weight_decay), "--lr", str(t.lr), "--clip-norm", str(t.clip_norm),
            "--max-tokens", str(t.max_tokens), "--required-batch-size-multiple", "1",
            "--num-workers", "0", "--disable-validation", "--no-save", "--log-format", "none"]
    if t.schedule == "inverse_sqrt":
        args += ["--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(t.warmup_steps)]
    else:
        sys.exit(f"the fairseq peer maps the inverse_sqrt schedule only, not {t.schedule!r}")
    if m.norm == "pre":
        args += ["--encoder-normalize-before", "--decoder-normalize-before"]
    if m.share_embeddings:
        args += ["--share-all-embeddings"]
    elif m.tie_output:
        args += ["--share-decoder-input-output-embed"]
    return args
