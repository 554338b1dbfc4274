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

Speech translation adds an auxiliary CTC head (``model.aux_ctc_weight``) over the vocabulary of
the source-language transcripts: a training signal for the encoder only (Weiss et al., 2017,
"Sequence-to-sequence models can directly translate foreign speech"), never used in decoding.
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
from encdec.nn.dropout import dropout
from encdec.nn.layers import Embedding, Positions
from encdec.nn.norms import make_norm
from encdec.nn.subsampling import Conv2dSubsampling


def _ctc_log_probs(head: nn.Linear, memory: torch.Tensor, not_labels: torch.Tensor) -> torch.Tensor:
    """(B, S, V) CTC log-probabilities of ``head`` on the encoder output (B, S, d).

    <s> and </s> are never CTC labels (blank is <pad>): they are ruled out of the head with a
    finite floor (-inf makes the CTC loss's gradient nan)."""
    logits = head(memory).float().index_fill(-1, not_labels.to(memory.device), -1e4)
    return F.log_softmax(logits, dim=-1)


class SpeechTransformer(TransformerSeq2Seq):
    non_autoregressive = False
    # train.init_parts -> the parameter-name prefixes that make up each part (buffers such as
    # the sinusoidal positions and rotary frequencies are rebuilt, not copied)
    PARTS = {"front": ("front.",), "encoder": ("encoder.", "enc_norm."), "ctc": ("ctc.",),
             "decoder": ("tgt_embed.", "decoder.", "dec_norm.", "output.")}

    def __init__(self, cfg: ModelConfig, feature_bins: int, tgt_vocab_size: int,
                 transcript_vocab_size: int = 0):
        """``transcript_vocab_size``: the source-language transcripts' vocabulary, for the
        auxiliary CTC head (``model.aux_ctc_weight`` > 0); 0 = the data has none."""
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
            self.enc_norm = make_norm(cfg.norm_type, d)  # the blocks' residual stream, once
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
        self.aux_ctc = None
        if cfg.aux_ctc_weight > 0:
            if not transcript_vocab_size:
                from encdec.config import ConfigError

                raise ConfigError(f"model.aux_ctc_weight={cfg.aux_ctc_weight} needs data with "
                                  "source-language transcripts (a \"transcript\" field, e.g. "
                                  "encdec prepare bible-speech-es); set it to 0 for this data")
            self.aux_ctc = nn.Linear(d, transcript_vocab_size)
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
        x = dropout(x, self.cfg.dropout, self.training)
        attn_mask = None if bool(memory_mask.all()) else memory_mask[:, None, None, :]
        for layer in self.encoder:
            if self.conformer:
                x = layer(x, attn_mask, memory_mask, self.rotary)
            else:
                x = layer(x, attn_mask, memory_mask)
        if self.enc_norm is not None:
            x = self.enc_norm(x, memory_mask)
        ctc = _ctc_log_probs(self.ctc, x, self._not_labels) if self.ctc is not None else None
        return EncoderOut(x, memory_mask, ctc)

    def aux_ctc_log_probs(self, encoder_out: EncoderOut) -> torch.Tensor:
        """(B, S, V_transcript) log-probabilities of the auxiliary CTC head (training only)."""
        return _ctc_log_probs(self.aux_ctc, encoder_out.memory, self._not_labels)

    def forward(self, src_feats: torch.Tensor, src_lengths: torch.Tensor,
                tgt_in: torch.Tensor | None):
        """(decoder hidden states (B, T, d), or None without a decoder or without ``tgt_in``
        (CTC warm-up: the encoder alone), encoder output)."""
        encoder_out = self.encode(src_feats, src_lengths)
        hidden = None
        if self.has_decoder and tgt_in is not None:
            hidden = self.decode(tgt_in, encoder_out)[0]
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
