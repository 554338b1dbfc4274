"""Speech training throughput: encdec's SpeechTransformer vs a plain-PyTorch model of the same size.

    python benchmarks/asr_train_speed.py [--config configs/asr-transformer.yaml] [--steps 30]
                                         [--warmup 5] [--repeats 3] [--threads 2] [overrides...]

Throughput = audio seconds trained on per second (each batch's real frame counts x 10 ms over
the step time), and steps/s, over ``--steps`` timed steps after ``--warmup`` untimed ones, on a
fixed list of real batches: the trainer's first batches of the train split (epoch 0,
``train.max_frames``), collated once with augmentation off, so feature computation is not in
the timed step. The config must have Transformer encoder blocks (asr-transformer; asr-small's
Conformer blocks have no plain-PyTorch counterpart). Runs alternate (encdec, reference, reference, encdec, ...) in one process; the
medians of ``--repeats`` and their ratio are printed, then the peak RSS of the process. Building
the same batches with augmentation on (speed perturbation, noise, SpecAugment: what the trainer
does in its own process between steps) is timed once and printed on its own line. CPU, fp32.

encdec's side is ``Trainer._train_step``: the model from ``model_for_data`` (seed
``train.seed``), ``make_optimizer``, ``ctc_attention_loss`` / target tokens, backward, clip,
step. The reference (``ReferenceSpeech`` below) is on equal footing: the same optimizer
(``make_optimizer``: fused AdamW, no decay on 1-D parameters), lr schedule (``lr_at``), clip,
loss scaling, dropout seed and a ``float(loss)`` read per step; the same model (nn.Conv2d x2
front with the same channels and projection, sinusoidal positions, ``nn.TransformerEncoder`` /
``nn.TransformerDecoder``, norm_first, with final LayerNorms, the output tied to the target
embedding, a CTC ``nn.Linear`` head with <s>/</s> floored as encdec does), dropout on embeddings
and sublayer outputs only (attention/activation dropout per the config, 0 by default), and
encdec's initial weights. Parameter counts and the first batch's loss with dropout off are
printed for both.

Differences that remain: nn.MultiheadAttention turns key-padding masks into additive float
masks (encdec passes boolean masks to SDPA); the reference's CE is ``F.cross_entropy`` (encdec's
``label_smoothed_nll`` also returns the NLL for its logs); encdec's step also computes the audio
seconds and the scheduled-sampling probability for its logs. All counted against encdec.
"""

from __future__ import annotations

import argparse
import math
import resource
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference import _ffn_norms, _self_attn, count_parameters

from encdec.config import Config
from encdec.data.assets import load_assets
from encdec.data.dataset import token_batches
from encdec.data.utterances import Augmenter, UtteranceSplit, collate_speech
from encdec.data.vocab import BOS, EOS, PAD
from encdec.losses import ctc_attention_loss
from encdec.models import model_for_data
from encdec.nn.layers import sinusoidal_table
from encdec.train import Trainer, lr_at, make_optimizer

RSS_LIMIT_GB = 2.5


class ReferenceSpeech(nn.Module):
    """Joint CTC/attention in plain PyTorch: Conv2d subsampling x4, nn.TransformerEncoder and
    nn.TransformerDecoder (pre-LN), a CTC head on the encoder, tied output projection."""

    def __init__(self, cfg, feature_bins: int, vocab: int):
        super().__init__()
        if not (cfg.subsampling == 4 and cfg.encoder_block == "transformer" and cfg.norm == "pre"
                and cfg.norm_type == "layernorm" and cfg.positions == "sinusoidal"
                and cfg.tie_output and 0 < cfg.ctc_weight < 1
                and not getattr(cfg, "aux_ctc_weight", 0)):
            raise ValueError("the reference covers model.subsampling=4, encoder_block=transformer, "
                             "norm=pre, norm_type=layernorm, positions=sinusoidal, tie_output, "
                             "0 < ctc_weight < 1 and aux_ctc_weight=0 (configs/asr-transformer"
                             ".yaml); this config has no plain-PyTorch counterpart here")
        d, C = cfg.d_model, cfg.front_channels or cfg.d_model
        self.d, self.ctc_weight = d, cfg.ctc_weight
        self.front = nn.Sequential(nn.Conv2d(1, C, 3, 2), nn.ReLU(), nn.Conv2d(C, C, 3, 2), nn.ReLU())
        self.front_out = nn.Linear(C * (((feature_bins - 1) // 2 - 1) // 2), d)
        layer_args = {"d_model": d, "nhead": cfg.n_heads, "dim_feedforward": cfg.ffn_dim,
                      "dropout": cfg.dropout, "activation": cfg.activation,
                      "batch_first": True, "norm_first": True}
        with warnings.catch_warnings():  # "enable_nested_tensor ... norm_first": inference only
            warnings.simplefilter("ignore")
            self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer_args),
                                                 cfg.enc_layers, norm=nn.LayerNorm(d),
                                                 enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer_args),
                                             cfg.dec_layers, norm=nn.LayerNorm(d))
        # nn's one `dropout` also drops attention probabilities and the FFN activation; encdec
        # has separate settings for those (0 by default).
        for layer in [*self.encoder.layers, *self.decoder.layers]:
            for attn in (layer.self_attn, getattr(layer, "multihead_attn", None)):
                if attn is not None:
                    attn.dropout = cfg.attention_dropout
            layer.dropout = nn.Dropout(cfg.activation_dropout) if cfg.activation_dropout \
                else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.ctc = nn.Linear(d, vocab)
        self.tgt_embed = nn.Embedding(vocab, d, padding_idx=PAD)
        self.output = nn.Linear(d, vocab, bias=False)
        self.output.weight = self.tgt_embed.weight
        self.register_buffer("pos", sinusoidal_table(cfg.max_positions, d), persistent=False)

    def positions(self, length: int) -> torch.Tensor:
        if length > self.pos.size(0):  # sinusoids extend to any length
            self.pos = sinusoidal_table(2 * length, self.d)
        return self.pos[:length]

    def encode(self, feats, lengths):
        h = self.front(feats[:, None])  # (B, C, S, F')
        B, C, S, Fq = h.shape
        x = self.front_out(h.transpose(1, 2).reshape(B, S, C * Fq))  # (B, S, d)
        lengths = ((lengths - 3) // 2 - 2) // 2 + 1  # two 3x3 convolutions, stride 2, no padding
        pad = torch.arange(S)[None, :] >= lengths[:, None]  # (B, S), True at padding
        x = self.drop(x * math.sqrt(self.d) + self.positions(S))
        memory = self.encoder(x, src_key_padding_mask=pad if bool(pad.any()) else None)
        logits = self.ctc(memory).index_fill(-1, torch.tensor([BOS, EOS]), -1e4)  # never labels
        return memory, pad, lengths, F.log_softmax(logits, dim=-1)

    def loss(self, batch, smoothing: float):
        """(1 - w) * label-smoothed CE + w * CTC, summed, as ``ctc_attention_loss``."""
        memory, pad, lengths, ctc_log_probs = self.encode(batch.src_feats, batch.src_lengths)
        T = batch.tgt_in.size(1)
        y = self.drop(self.tgt_embed(batch.tgt_in) * math.sqrt(self.d) + self.positions(T))
        causal = nn.Transformer.generate_square_subsequent_mask(T)
        hidden = self.decoder(y, memory, tgt_mask=causal, tgt_is_causal=True,
                              memory_key_padding_mask=pad)
        keep = batch.tgt_out.ne(PAD)
        ce = F.cross_entropy(self.output(hidden[keep]), batch.tgt_out[keep],
                             label_smoothing=smoothing, reduction="sum")
        targets = batch.tgt_out.masked_fill(batch.tgt_out.eq(EOS), PAD)  # (B, T), blank = PAD
        ctc = F.ctc_loss(ctc_log_probs.transpose(0, 1), targets, lengths, targets.ne(PAD).sum(1),
                         blank=PAD, reduction="sum", zero_infinity=True)
        return (1 - self.ctc_weight) * ce + self.ctc_weight * ctc

    def load_encdec(self, model):
        """Copy an encdec SpeechTransformer's weights (same layout, other names)."""
        convs = model.front.convs
        sd = {"front.0.weight": convs[0].weight, "front.0.bias": convs[0].bias,
              "front.2.weight": convs[2].weight, "front.2.bias": convs[2].bias,
              "front_out.weight": model.front.out.weight, "front_out.bias": model.front.out.bias,
              "ctc.weight": model.ctc.weight, "ctc.bias": model.ctc.bias,
              "tgt_embed.weight": model.tgt_embed.tokens.weight, "output.weight": model.output.weight}
        for i, layer in enumerate(model.encoder):
            _self_attn(sd, f"encoder.layers.{i}.", layer.self_attn)
            _ffn_norms(sd, f"encoder.layers.{i}.", layer.ffn, [layer.attn_sub.norm, layer.ffn_sub.norm])
        for i, layer in enumerate(model.decoder):
            p, ca = f"decoder.layers.{i}.", layer.cross_attn
            _self_attn(sd, p, layer.self_attn)
            sd[p + "multihead_attn.in_proj_weight"] = torch.cat([ca.q_proj.weight, ca.kv_proj.weight])
            sd[p + "multihead_attn.in_proj_bias"] = torch.cat([ca.q_proj.bias, ca.kv_proj.bias])
            sd[p + "multihead_attn.out_proj.weight"] = ca.out_proj.weight
            sd[p + "multihead_attn.out_proj.bias"] = ca.out_proj.bias
            _ffn_norms(sd, p, layer.ffn, [layer.self_sub.norm, layer.cross_sub.norm, layer.ffn_sub.norm])
        for side, norm in (("encoder", model.enc_norm), ("decoder", model.dec_norm)):
            sd[f"{side}.norm.weight"], sd[f"{side}.norm.bias"] = norm.weight, norm.bias
        self.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
        return self


def audio_seconds(batch) -> float:
    return float(batch.src_lengths.sum()) * 0.01  # 10 ms per real feature frame


def _timed(step, batches, warmup: int, steps: int) -> tuple[float, float]:
    """(audio seconds per second, steps per second) over the timed steps."""
    for i, b in enumerate(batches[:warmup]):
        step(i, b)
    audio, start = 0.0, time.perf_counter()
    for i, b in enumerate(batches[warmup:warmup + steps], warmup):
        step(i, b)
        audio += audio_seconds(b)
    seconds = time.perf_counter() - start
    return audio / seconds, steps / seconds


def run_ours(cfg: Config, batches, warmup: int, steps: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg.train.run_dir = tmp
        trainer = Trainer(cfg, log=lambda *a: None, progress=False)
        trainer.model.train()
        return _timed(lambda i, b: trainer._train_step([b]), batches, warmup, steps)


def build_reference(cfg: Config, meta: dict) -> ReferenceSpeech:
    """The reference, starting from the weights encdec's trainer starts from."""
    ref = ReferenceSpeech(cfg.model, meta["feature_bins"], meta["tgt_vocab_size"])
    torch.manual_seed(cfg.train.seed)  # as Trainer does before model_for_data
    return ref.load_encdec(model_for_data(cfg.model, meta))


def run_reference(cfg: Config, meta: dict, batches, warmup: int, steps: int) -> tuple[float, float]:
    t = cfg.train
    model = build_reference(cfg, meta).train()
    opt = make_optimizer(model, t)
    torch.manual_seed(t.seed * 1000)  # the trainer's dropout seed

    def step(i, b):
        for group in opt.param_groups:
            group["lr"] = lr_at(i, t)
        loss = model.loss(b, t.label_smoothing)
        (loss / b.num_tgt_tokens).backward()
        if t.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())

    return _timed(step, batches, warmup, steps)


@torch.no_grad()
def check_same_model(cfg: Config, meta: dict, batch) -> None:
    """Parameter counts (fail if > 0.5% apart) and the first batch's loss with dropout off."""
    torch.manual_seed(cfg.train.seed)
    ours = model_for_data(cfg.model, meta).eval()
    ref = build_reference(cfg, meta).eval()
    n_ours, n_ref = count_parameters(ours), count_parameters(ref)
    ls = cfg.train.label_smoothing
    l_ours, l_ref = float(ctc_attention_loss(ours, batch, ls)[0]), float(ref.loss(batch, ls))
    print(f"parameters: encdec {n_ours:,}, reference {n_ref:,}; first batch loss, dropout off: "
          f"encdec {l_ours:.2f}, reference {l_ref:.2f}")
    if abs(n_ours - n_ref) > 0.005 * n_ours:
        sys.exit(f"error: the reference has {n_ref:,} parameters, encdec {n_ours:,}: not the "
                 "same size (more than 0.5% apart), so the comparison would mislead")


def build_batches(split, order, front, augmenter, seed: int) -> tuple[list, float]:
    """Collated batches of ``order`` (augmented when ``augmenter``) and the seconds it took."""
    start = time.perf_counter()
    batches = [collate_speech(split, idx, front, augmenter, (seed, 0, i, 0))
               for i, idx in enumerate(order)]
    return batches, time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/asr-transformer.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. model.enc_layers=12")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = Config.load(args.config, [*args.overrides, f"train.num_threads={args.threads}",
                                    "train.device=cpu"])
    t, m = cfg.train, cfg.model
    assets = load_assets(cfg.data.dir)
    meta = assets.meta
    split = UtteranceSplit(cfg.data.dir, "train", meta["sample_rate"])
    order = token_batches(split.frames, split.tgt_lens, t.max_frames, seed=t.seed,
                          epoch=0)[: args.warmup + args.steps]  # the trainer's first batches
    batches, _ = build_batches(split, order, assets.audio_front, None, t.seed)
    augmented, build_s = build_batches(split, order, assets.audio_front,
                                       Augmenter(cfg.augment, meta["sample_rate"]), t.seed)
    mean_audio = statistics.mean(audio_seconds(b) for b in batches)
    print(f"$ {shlex.join([sys.executable, *sys.argv])}")
    print(f"{args.config}: {m.enc_layers}+{m.dec_layers} x {m.d_model}, ffn {m.ffn_dim}, front "
          f"{m.front_channels or m.d_model} channels, ctc weight {m.ctc_weight}; "
          f"{mean_audio:.1f} audio s/batch ({statistics.mean(len(b.src_lengths) for b in batches):.1f} "
          f"utterances), steps {args.warmup}-{args.warmup + args.steps}, {args.threads} threads, "
          f"fp32, torch {torch.__version__}")
    aug_audio = sum(audio_seconds(b) for b in augmented)
    print(f"batch building with augmentation on (not in the timed step): "
          f"{1000 * build_s / aug_audio:.2f} ms per audio s ({build_s:.1f} s for "
          f"{len(augmented)} batches, {aug_audio:.0f} audio s)")
    del augmented
    check_same_model(cfg, meta, batches[0])
    ours, ref = [], []
    for r in range(args.repeats):
        pair = [(lambda: run_ours(cfg, batches, args.warmup, args.steps), ours),
                (lambda: run_reference(cfg, meta, batches, args.warmup, args.steps), ref)]
        for fn, out in pair if r % 2 == 0 else pair[::-1]:  # ABBA: no side always first
            out.append(fn())
        print(f"  run {r + 1}: encdec {ours[-1][0]:,.1f} audio s/s ({ours[-1][1]:.3f} steps/s)   "
              f"reference {ref[-1][0]:,.1f} audio s/s ({ref[-1][1]:.3f} steps/s)   "
              f"ratio {ours[-1][0] / ref[-1][0]:.2f}", flush=True)
    (mo, so), (mr, sr) = [[statistics.median(x) for x in zip(*runs)] for runs in (ours, ref)]
    print(f"median of {args.repeats}: encdec {mo:,.1f} audio s/s ({so:.3f} steps/s), reference "
          f"{mr:,.1f} audio s/s ({sr:.3f} steps/s), ratio {mo / mr:.2f}x")
    print(f"encdec with its batch building in the same process, as the trainer does: "
          f"{1 / (1 / mo + build_s / aug_audio):,.1f} audio s/s")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: KiB
    print(f"peak RSS of this process {peak_gb:.2f} GB: "
          f"{'within' if peak_gb <= RSS_LIMIT_GB else 'OVER'} the {RSS_LIMIT_GB} GB limit")


if __name__ == "__main__":
    main()
