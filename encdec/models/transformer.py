"""The Transformer encoder-decoder (Vaswani et al., 2017), post-LN or pre-LN."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from encdec.config import ConfigError, ModelConfig
from encdec.data.vocab import PAD
from encdec.models.base import DecoderState, EncoderOut
from encdec.nn.attention import KVCache, MultiHeadAttention
from encdec.nn.dropout import residual_dropout
from encdec.nn.layers import Embedding, FeedForward, Positions
from encdec.nn.norms import make_norm


class Sublayer(nn.Module):
    """The normalization and residual connection around one sublayer: pre-LN normalizes the
    sublayer's input (``before``), post-LN the residual sum (``after``). ``pad_mask`` (B, T)
    marks real positions (BatchNorm's statistics use only those)."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool, norm_type: str = "layernorm"):
        super().__init__()
        self.norm = make_norm(norm_type, d_model)
        self.dropout = dropout
        self.pre_norm = pre_norm

    def before(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The sublayer's input."""
        return self.norm(x, pad_mask) if self.pre_norm else x

    def after(self, x: torch.Tensor, out: torch.Tensor,
              pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after the sublayer's output ``out``: x + dropout(out)."""
        x = residual_dropout(x, out, self.dropout, self.training)
        return x if self.pre_norm else self.norm(x, pad_mask)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        pre = cfg.norm == "pre"
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.activation, cfg.activation_dropout)
        self.attn_sub = Sublayer(cfg.d_model, cfg.dropout, pre, cfg.norm_type)
        self.ffn_sub = Sublayer(cfg.d_model, cfg.dropout, pre, cfg.norm_type)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None,
                pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, S, d); mask (B, 1, 1, S) True at real positions, or None (nothing padded)."""
        # 1 self-attention
        h, _ = self.self_attn(self.attn_sub.before(x, pad_mask), attn_mask=mask)
        x = self.attn_sub.after(x, h, pad_mask)
        # 2 position-wise feed-forward
        h = self.ffn(self.ffn_sub.before(x, pad_mask))
        return self.ffn_sub.after(x, h, pad_mask)


@dataclass
class LayerCache:
    """One decoder layer's state in incremental decoding (``TransformerSeq2Seq.init_state``)."""

    cross: KVCache  # (G, nh, S, hd): the projected encoder output, one per input (group)
    self_attn: KVCache = field(default_factory=KVCache)  # (N, nh, t, hd): one per decoder row

    def reorder(self, rows: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        """Keep/reorder decoder ``rows``; ``groups``: the inputs of the new groups, when those
        change (None: the same inputs in the same order)."""
        self.self_attn = self.self_attn.select(rows)
        if groups is not None:
            self.cross = self.cross.select(groups)


class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention to the encoder output, feed-forward; each with
    its residual connection and normalization. Three ways in: ``forward`` (teacher forcing,
    every target position at once), ``step`` (incremental decoding with a ``LayerCache``) and
    ``parallel`` (the non-autoregressive decoder: no causal mask)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        pre = cfg.norm == "pre"
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout, cross=True)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.activation, cfg.activation_dropout)
        self.self_sub = Sublayer(cfg.d_model, cfg.dropout, pre, cfg.norm_type)
        self.cross_sub = Sublayer(cfg.d_model, cfg.dropout, pre, cfg.norm_type)
        self.ffn_sub = Sublayer(cfg.d_model, cfg.dropout, pre, cfg.norm_type)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
                pad_mask: torch.Tensor | None = None, need_attention: bool = False,
                memory_keys: torch.Tensor | None = None):
        """Teacher forcing: x (B, T, d), each position sees itself and those before it.
        memory (B, S, d), memory_mask (B, 1, 1, S). ``memory_keys`` (B, S, d): what the
        cross-attention keys are projected from, when not ``memory``.
        Returns (B, T, d) and the cross-attention weights (B, nh, T, S) if asked for."""
        return self._sublayers(x, pad_mask, self_mask=None, causal=x.size(1) > 1,
                               self_cache=None, memory=memory, memory_mask=memory_mask,
                               memory_keys=memory_keys, need_attention=need_attention)

    def parallel(self, x: torch.Tensor, self_mask: torch.Tensor, memory: torch.Tensor,
                 memory_mask: torch.Tensor, pad_mask: torch.Tensor,
                 cross: KVCache | None = None, need_attention: bool = False):
        """Non-autoregressive: every position sees every real target position (``self_mask``
        (N, 1, 1, T)). ``cross``: the projected memory of G inputs, shared by N / G
        consecutive rows each (``memory`` is then unused)."""
        return self._sublayers(x, pad_mask, self_mask=self_mask, causal=False, self_cache=None,
                               memory=memory, memory_mask=memory_mask, cross=cross,
                               need_attention=need_attention)

    def step(self, x: torch.Tensor, cache: LayerCache, memory_mask: torch.Tensor,
             need_attention: bool = False):
        """Incremental decoding: x (N, 1, d), the newest token of each row; the cache holds
        the earlier tokens' keys/values (this step's are appended) and the projected memory
        of the G groups (memory_mask (G, 1, 1, S))."""
        return self._sublayers(x, None, self_mask=None, causal=False, self_cache=cache.self_attn,
                               cross=cache.cross, memory_mask=memory_mask,
                               need_attention=need_attention)

    def _sublayers(self, x, pad_mask, *, self_mask, causal, self_cache, memory_mask,
                   memory=None, memory_keys=None, cross=None, need_attention=False):
        """The three sublayers; cross-attention reads ``cross`` (grouped rows) when given,
        else projects ``memory``."""
        # 1 masked self-attention (over the target so far; NAT: over every target position)
        h, _ = self.self_attn(self.self_sub.before(x, pad_mask), attn_mask=self_mask,
                              is_causal=causal, cache=self_cache)
        x = self.self_sub.after(x, h, pad_mask)
        # 2 cross-attention to the encoder output
        h = self.cross_sub.before(x, pad_mask)
        if cross is None:
            h, weights = self.cross_attn(h, memory, attn_mask=memory_mask,
                                         need_weights=need_attention, memory_keys=memory_keys)
        else:
            h, weights = self._grouped_cross(h, cross, memory_mask, need_attention)
        x = self.cross_sub.after(x, h, pad_mask)
        # 3 position-wise feed-forward
        h = self.ffn(self.ffn_sub.before(x, pad_mask))
        return self.ffn_sub.after(x, h, pad_mask), weights

    def _grouped_cross(self, h, cross: KVCache, memory_mask, need_attention):
        # Rows of one group (e.g. the beams of one input) share the projected memory: fold
        # them into the query-length axis so no K/V copy per beam is needed.
        G, S = cross.k.size(0), cross.k.size(2)  # (G, nh, S, hd)
        N, T, d = h.shape
        q_in = h.reshape(G, (N // G) * T, d)  # (G, K*T, d)
        out, weights = self.cross_attn(q_in, attn_mask=memory_mask, cache=cross,
                                       need_weights=need_attention)
        if weights is not None:
            # (G, nh, K*T, S) -> (N, nh, T, S), the layout of the uncached path
            weights = weights.view(G, -1, N // G, T, S).transpose(1, 2).reshape(N, -1, T, S)
        return out.reshape(N, T, d), weights


class TransformerSeq2Seq(nn.Module):
    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int):
        super().__init__()
        self.cfg = cfg
        positions = Positions(cfg.positions, cfg.d_model, cfg.max_positions)
        self.src_embed = Embedding(src_vocab_size, cfg.d_model, positions, cfg.dropout)
        if cfg.share_embeddings:
            if src_vocab_size != tgt_vocab_size:
                raise ConfigError("model.share_embeddings needs a joint vocabulary (source "
                                  f"{src_vocab_size} vs target {tgt_vocab_size} tokens): "
                                  "prepare the data with --joint-vocab, or set "
                                  "model.share_embeddings=false")
            self.tgt_embed = Embedding(tgt_vocab_size, cfg.d_model, positions, cfg.dropout)
            self.tgt_embed.tokens = self.src_embed.tokens
        else:
            # Learned positions are per side; sinusoids are shared (they have no parameters).
            tgt_pos = Positions(cfg.positions, cfg.d_model, cfg.max_positions) \
                if cfg.positions == "learned" else positions
            self.tgt_embed = Embedding(tgt_vocab_size, cfg.d_model, tgt_pos, cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        pre = cfg.norm == "pre"
        self.enc_norm = make_norm(cfg.norm_type, cfg.d_model) if pre else None
        self.dec_norm = make_norm(cfg.norm_type, cfg.d_model) if pre else None
        self.output = nn.Linear(cfg.d_model, tgt_vocab_size, bias=False)
        self._init_linear()
        if cfg.tie_output:
            self.output.weight = self.tgt_embed.tokens.weight
        else:
            nn.init.normal_(self.output.weight, std=cfg.d_model ** -0.5)

    def _init_linear(self):
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module is not self.output:
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ---- encoder ------------------------------------------------------------------------
    def encode(self, src_tokens: torch.Tensor) -> EncoderOut:
        memory_mask = src_tokens.ne(PAD)  # (B, S)
        # No mask at all when nothing is padded: lets SDPA take its fastest path.
        attn_mask = None if bool(memory_mask.all()) else memory_mask[:, None, None, :]
        x = self.src_embed(src_tokens)
        for layer in self.encoder:
            x = layer(x, attn_mask, memory_mask)
        if self.enc_norm is not None:
            x = self.enc_norm(x, memory_mask)
        return EncoderOut(x, memory_mask)

    # ---- teacher-forced decoder (training, uncached scoring) -----------------------------
    def decode(self, tgt_in: torch.Tensor, encoder_out: EncoderOut,
               need_attention: bool = False):
        """Hidden states (B, T, d) for every target position; and last-layer cross-attention."""
        mask = encoder_out.memory_mask[:, None, None, :]
        pad_mask = tgt_in.ne(PAD)
        x = self.tgt_embed(tgt_in)
        weights = None
        for layer in self.decoder:
            x, weights = layer(x, encoder_out.memory, mask, need_attention=need_attention,
                               pad_mask=pad_mask)
        if weights is not None:
            weights = weights.mean(dim=1)  # (B, T, S)
        return self._final_norm(x, pad_mask), weights

    def _final_norm(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.dec_norm(x, pad_mask) if self.dec_norm is not None else x

    def forward(self, src_tokens: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        """Decoder hidden states (B, T, d); project with ``logits`` (only where needed)."""
        return self.decode(tgt_in, self.encode(src_tokens))[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.output(hidden)

    # ---- incremental decoding contract (see models/base.py) ------------------------------
    def init_state(self, encoder_out: EncoderOut, group_size: int = 1) -> DecoderState:
        layers = []
        for layer in self.decoder:
            k, v = layer.cross_attn.project_memory(encoder_out.memory)  # (B, nh, S, hd)
            layers.append(LayerCache(cross=KVCache(k, v)))
        state = DecoderState(group_size=1, memory_mask=encoder_out.memory_mask, layers=layers)
        if group_size > 1:
            B = encoder_out.memory.size(0)
            rows = torch.arange(B, device=encoder_out.memory.device).repeat_interleave(group_size)
            state = self.reorder_state(state, rows, group_size)
        return state

    def decode_step(self, prev_tokens: torch.Tensor, state: DecoderState,
                    need_attention: bool = False):
        x = self.tgt_embed(prev_tokens[:, None], offset=state.step)  # (N, 1, d)
        mask = state.memory_mask[:, None, None, :]  # (G, 1, 1, S)
        weights = None
        for i, layer in enumerate(self.decoder):
            last = i == len(self.decoder) - 1
            x, weights = layer.step(x, state.layers[i], mask, need_attention=need_attention and last)
        state.step += 1
        logits = self.output(self._final_norm(x)[:, 0])  # (N, V)
        attention = weights.mean(dim=1)[:, 0] if weights is not None else None  # (N, S)
        return F.log_softmax(logits.float(), dim=-1), attention

    def reorder_state(self, state: DecoderState, index: torch.Tensor,
                      group_size: int | None = None) -> DecoderState:
        return state.reorder(index, group_size)
