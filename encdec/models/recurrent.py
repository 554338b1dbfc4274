"""Recurrent encoder-decoder with attention: the baseline the Transformer replaced.

Encoder: a (bi)LSTM or GRU over the source embeddings (no positions: order comes from the
recurrence). Decoder: an LSTM or GRU whose input at step t is the previous target token's
embedding concatenated with the previous attentional vector (input feeding, Luong et al.,
2015); its top hidden state h_t attends over the encoder output with multiplicative (Luong
"general": h_t W m_s) or additive (Bahdanau: v . tanh(W h_t + U m_s)) scores; the context c_t
and h_t make the attentional vector tanh(W_c [c_t; h_t]), which is projected to the vocabulary.

The decoder state is initialized from the masked mean of the encoder output through a linear
bridge. It implements the same contract as the Transformer (``models/base.py``), so greedy,
beam search and sampling work unchanged; rows of one group (the beams of an input) share that
input's encoder output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encdec.config import ModelConfig
from encdec.data.vocab import PAD
from encdec.models.base import DecoderState, EncoderOut
from encdec.nn.dropout import Dropout

_CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}


class Attention(nn.Module):
    """Scores of one query per row against a group's memory; rows are (G, K, d) for G groups."""

    def __init__(self, d_model: int, kind: str):
        super().__init__()
        self.kind = kind
        if kind == "luong":
            self.w = nn.Linear(d_model, d_model, bias=False)
        else:  # bahdanau
            self.w_query = nn.Linear(d_model, d_model, bias=False)
            self.w_memory = nn.Linear(d_model, d_model, bias=True)
            self.v = nn.Linear(d_model, 1, bias=False)

    def project_memory(self, memory: torch.Tensor) -> torch.Tensor:
        """Per-input precomputation over the memory (B, S, d)."""
        return memory if self.kind == "luong" else self.w_memory(memory)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, projected: torch.Tensor,
                memory_mask: torch.Tensor):
        """query (G, K, d), memory/projected (G, S, d), memory_mask (G, S) -> context (G, K, d),
        weights (G, K, S)."""
        if self.kind == "luong":
            scores = torch.bmm(self.w(query), projected.transpose(1, 2))  # (G, K, S)
        else:
            hidden = torch.tanh(self.w_query(query)[:, :, None, :] + projected[:, None, :, :])
            scores = self.v(hidden).squeeze(-1)  # (G, K, S)
        scores = scores.masked_fill(~memory_mask[:, None, :], float("-inf"))
        weights = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        return torch.bmm(weights, memory), weights


@dataclass
class RecurrentCache:
    """The recurrent decoder's state in incremental decoding (N rows in G groups)."""

    h: torch.Tensor  # (layers, N, d) hidden state
    c: torch.Tensor | None  # (layers, N, d) LSTM cell state; None for a GRU
    feed: torch.Tensor  # (N, d) the last attentional vector (input feeding)
    memory: torch.Tensor  # (G, S, d) encoder output, one per input
    projected: torch.Tensor  # (G, S, d) its attention keys

    def reorder(self, rows: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        """Keep/reorder decoder ``rows``; ``groups``: the inputs of the new groups, when those
        change."""
        self.h = self.h.index_select(1, rows)
        self.c = self.c.index_select(1, rows) if self.c is not None else None
        self.feed = self.feed.index_select(0, rows)
        if groups is not None:
            self.memory = self.memory.index_select(0, groups)
            self.projected = self.projected.index_select(0, groups)


class RecurrentSeq2Seq(nn.Module):
    samples_own_inputs = True  # scheduled sampling happens step by step inside forward()

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        cell = _CELLS[cfg.arch]
        self.is_lstm = cfg.arch == "lstm"
        self.src_embed = nn.Embedding(src_vocab_size, d, padding_idx=PAD)
        if cfg.share_embeddings:
            if src_vocab_size != tgt_vocab_size:
                raise ValueError("model.share_embeddings needs a joint vocabulary "
                                 f"(source {src_vocab_size} vs target {tgt_vocab_size} tokens)")
            self.tgt_embed = self.src_embed
        else:
            self.tgt_embed = nn.Embedding(tgt_vocab_size, d, padding_idx=PAD)
        bi = cfg.rnn_bidirectional
        if bi and d % 2:
            raise ValueError(f"model.d_model={d} must be even for a bidirectional encoder")
        self.encoder = cell(d, d // 2 if bi else d, num_layers=cfg.enc_layers, batch_first=True,
                            bidirectional=bi, dropout=cfg.dropout if cfg.enc_layers > 1 else 0.0)
        self.bridge = nn.Linear(d, d * cfg.dec_layers)
        self.decoder = cell(2 * d, d, num_layers=cfg.dec_layers, batch_first=True,
                            dropout=cfg.dropout if cfg.dec_layers > 1 else 0.0)
        self.attention = Attention(d, cfg.rnn_attention)
        self.combine = nn.Linear(2 * d, d, bias=False)
        self.dropout = Dropout(cfg.dropout)
        self.output = nn.Linear(d, tgt_vocab_size, bias=False)
        for emb in (self.src_embed, self.tgt_embed):
            nn.init.normal_(emb.weight, std=d ** -0.5)
            with torch.no_grad():
                emb.weight[PAD].zero_()
        if cfg.tie_output:
            self.output.weight = self.tgt_embed.weight

    # ---- encoder ------------------------------------------------------------------------
    def encode(self, src_tokens: torch.Tensor) -> EncoderOut:
        memory_mask = src_tokens.ne(PAD)  # (B, S)
        lengths = memory_mask.sum(1).clamp(min=1).cpu()
        x = self.dropout(self.src_embed(src_tokens))
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.encoder(packed)
        memory, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True,
                                                     total_length=src_tokens.size(1))
        return EncoderOut(self.dropout(memory), memory_mask)

    # ---- decoder ------------------------------------------------------------------------
    def init_state(self, encoder_out: EncoderOut, group_size: int = 1) -> DecoderState:
        memory, mask = encoder_out.memory, encoder_out.memory_mask
        keep = mask.unsqueeze(-1).to(memory.dtype)
        pooled = (memory * keep).sum(1) / keep.sum(1).clamp(min=1)  # (B, d)
        B, d = pooled.shape
        h = torch.tanh(self.bridge(pooled)).view(B, self.cfg.dec_layers, d).transpose(0, 1)
        h = h.contiguous()
        layer = RecurrentCache(h=h, c=torch.zeros_like(h) if self.is_lstm else None,
                               feed=memory.new_zeros(B, d), memory=memory,
                               projected=self.attention.project_memory(memory))
        state = DecoderState(group_size=1, memory_mask=mask, layers=[layer])
        if group_size > 1:
            rows = torch.arange(B, device=memory.device).repeat_interleave(group_size)
            state = self.reorder_state(state, rows, group_size)
        return state

    def _step(self, emb: torch.Tensor, state: DecoderState):
        """One step for all rows: emb (N, d) -> attentional vector (N, d), weights (N, S)."""
        s = state.layers[0]
        x = torch.cat([emb, s.feed], dim=-1)[:, None, :]  # (N, 1, 2d) input feeding
        out, hidden = self.decoder(x, (s.h, s.c) if self.is_lstm else s.h)
        s.h, s.c = hidden if self.is_lstm else (hidden, None)
        top = out[:, 0]  # (N, d)
        G, K = s.memory.size(0), top.size(0) // s.memory.size(0)
        context, weights = self.attention(top.view(G, K, -1), s.memory, s.projected,
                                          state.memory_mask)
        context, weights = context.reshape(top.shape), weights.reshape(top.size(0), -1)
        attentional = torch.tanh(self.combine(torch.cat([context, top], dim=-1)))
        s.feed = attentional
        state.step += 1
        return self.dropout(attentional), weights

    def decode(self, tgt_in: torch.Tensor, encoder_out: EncoderOut, need_attention: bool = False,
               sampling_prob: float = 0.0):
        """Hidden states (B, T, d) for every position, teacher-forced; with ``sampling_prob`` p
        each input after BOS is, with probability p, the model's own argmax prediction from
        the step before instead of the reference token (scheduled sampling)."""
        state = self.init_state(encoder_out)
        outs, attn = [], []
        prev = tgt_in[:, 0]
        for t in range(tgt_in.size(1)):
            if t > 0:
                prev = tgt_in[:, t]
                if sampling_prob > 0:
                    with torch.no_grad():
                        predicted = self.output(outs[-1]).argmax(-1)
                    use = torch.rand(prev.shape, device=prev.device) < sampling_prob
                    prev = torch.where(use & prev.ne(PAD), predicted, prev)
            h, w = self._step(self.tgt_embed(prev), state)
            outs.append(h)
            attn.append(w)
        weights = torch.stack(attn, dim=1) if need_attention else None  # (B, T, S)
        return torch.stack(outs, dim=1), weights

    def forward(self, src_tokens: torch.Tensor, tgt_in: torch.Tensor,
                sampling_prob: float = 0.0) -> torch.Tensor:
        return self.decode(tgt_in, self.encode(src_tokens), sampling_prob=sampling_prob)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(hidden)

    def decode_step(self, prev_tokens: torch.Tensor, state: DecoderState,
                    need_attention: bool = False):
        h, weights = self._step(self.tgt_embed(prev_tokens), state)
        log_probs = F.log_softmax(self.output(h).float(), dim=-1)
        return log_probs, (weights if need_attention else None)

    def reorder_state(self, state: DecoderState, index: torch.Tensor,
                      group_size: int | None = None) -> DecoderState:
        return state.reorder(index, group_size)
