"""Speech in, text out: a frame front, Transformer or Conformer encoder blocks, a CTC head on
the encoder and the Transformer's attention decoder (Watanabe et al., 2017, "Hybrid
CTC/attention"; Gulati et al., 2020, Conformer).

The input is normalized log-mel frames with their lengths (``src_feats`` (B, T, F),
``src_lengths`` (B,)); the conv front subsamples them by ``model.subsampling`` to the encoder
positions S. The decoder and the incremental-decoding contract are ``TransformerSeq2Seq``'s, so
greedy and beam search work unchanged. The CTC head's log-probabilities travel in
``EncoderOut.ctc_log_probs``: beam search adds their prefix scores by weight without asking
which model it has, and CTC best-path decoding (``method ctc``) is the speech NAT.

With ``model.ctc_weight = 1`` there is no decoder: ``decode_step`` returns log-probability 0
for every token, so beam search ranks by the CTC prefix score alone (CTC prefix beam search).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from encdec.config import ModelConfig
from encdec.data.vocab import BOS, EOS
from encdec.models.base import DecoderState, EncoderOut
from encdec.models.transformer import DecoderLayer, EncoderLayer, TransformerSeq2Seq
from encdec.nn.layers import Embedding, Positions
from encdec.nn.norms import make_norm
from encdec.nn.subsampling import Conv2dSubsampling


class SpeechTransformer(TransformerSeq2Seq):
    non_autoregressive = False

    def __init__(self, cfg: ModelConfig, feature_bins: int, tgt_vocab_size: int):
        nn.Module.__init__(self)
        self.cfg = cfg
        d = cfg.d_model
        self.front = Conv2dSubsampling(feature_bins, d, cfg.subsampling, cfg.front_channels)
        self.front_scale = math.sqrt(d)
        self.conformer = cfg.encoder_block == "conformer"
        if self.conformer:
            from encdec.nn.rotary import Rotary
            from encdec.nn.conformer import ConformerLayer

            self.rotary = Rotary(d // cfg.n_heads)
            self.encoder = nn.ModuleList(
                ConformerLayer(d, cfg.n_heads, cfg.ffn_dim, cfg.conv_kernel, cfg.dropout,
                               cfg.attention_dropout, cfg.activation_dropout)
                for _ in range(cfg.enc_layers))
            self.enc_norm = None  # each Conformer block ends in its own LayerNorm
        else:
            self.rotary = None
            self.src_positions = Positions("sinusoidal", d, cfg.max_positions)
            self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
            self.enc_norm = make_norm(cfg.norm_type, d) if cfg.norm == "pre" else None
        self.ctc = nn.Linear(d, tgt_vocab_size) if cfg.ctc_weight > 0 else None
        self._not_labels = torch.tensor([BOS, EOS])
        self.has_decoder = cfg.ctc_weight < 1.0
        self.tgt_vocab_size = tgt_vocab_size
        if self.has_decoder:
            self.tgt_embed = Embedding(tgt_vocab_size, d, Positions(cfg.positions, d, cfg.max_positions),
                                       cfg.dropout)
            self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
            self.dec_norm = make_norm(cfg.norm_type, d) if cfg.norm == "pre" else None
            self.output = nn.Linear(d, tgt_vocab_size, bias=False)
        else:
            self.output = None
        self._init_linear()
        if self.has_decoder:
            if cfg.tie_output:
                self.output.weight = self.tgt_embed.tokens.weight
            else:
                nn.init.normal_(self.output.weight, std=d ** -0.5)

    # ---- encoder ------------------------------------------------------------------------
    def encode(self, src_feats: torch.Tensor, src_lengths: torch.Tensor) -> EncoderOut:
        """(B, T, F) frames and (B,) frame counts -> encoder output over S = T / subsampling
        positions, with the CTC head's log-probabilities (B, S, V) when there is one."""
        x, lengths = self.front(src_feats, src_lengths)  # (B, S, d), (B,)
        S = x.size(1)
        memory_mask = torch.arange(S, device=x.device)[None, :] < lengths[:, None].to(x.device)
        if not bool(memory_mask.any(dim=1).all()):
            raise ValueError("an input is too short for the conv front: it needs at least "
                             f"{self.front.min_frames()} frames "
                             f"({self.front.min_frames() * 10} ms)")
        x = x * self.front_scale
        if not self.conformer:
            x = x + self.src_positions(S)
        x = F.dropout(x, self.cfg.dropout, training=self.training)
        attn_mask = None if bool(memory_mask.all()) else memory_mask[:, None, None, :]
        for layer in self.encoder:
            if self.conformer:
                x = layer(x, attn_mask, memory_mask, self.rotary)
            else:
                x = layer(x, attn_mask, memory_mask)
        if self.enc_norm is not None:
            x = self.enc_norm(x, memory_mask)
        ctc = None
        if self.ctc is not None:
            # <s> and </s> are never CTC labels (blank is <pad>): rule them out of the head,
            # with a finite floor (-inf makes the CTC loss's gradient nan).
            logits = self.ctc(x).float().index_fill(-1, self._not_labels.to(x.device), -1e4)
            ctc = F.log_softmax(logits, dim=-1)  # (B, S, V)
        return EncoderOut(x, memory_mask, ctc)

    def forward(self, src_feats: torch.Tensor, src_lengths: torch.Tensor, tgt_in: torch.Tensor):
        """(decoder hidden states (B, T, d) or None without a decoder, encoder output)."""
        encoder_out = self.encode(src_feats, src_lengths)
        hidden = self.decode(tgt_in, encoder_out)[0] if self.has_decoder else None
        return hidden, encoder_out

    # ---- incremental decoding: without a decoder, every token scores 0 ------------------
    def init_state(self, encoder_out: EncoderOut, group_size: int = 1) -> DecoderState:
        if self.has_decoder:
            return super().init_state(encoder_out, group_size)
        mask = encoder_out.memory_mask.repeat_interleave(group_size, dim=0)
        return DecoderState(group_size=1, memory_mask=mask)

    def decode_step(self, prev_tokens: torch.Tensor, state: DecoderState,
                    need_attention: bool = False):
        if self.has_decoder:
            return super().decode_step(prev_tokens, state, need_attention)
        state.step += 1
        return prev_tokens.new_zeros((prev_tokens.size(0), self.tgt_vocab_size),
                                     dtype=torch.float32), None

    def reorder_state(self, state: DecoderState, index: torch.Tensor,
                      group_size: int | None = None) -> DecoderState:
        if self.has_decoder:
            return super().reorder_state(state, index, group_size)
        state.memory_mask = state.memory_mask.index_select(0, index)
        return state
