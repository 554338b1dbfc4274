"""The Transformer encoder-decoder (Vaswani et al., 2017), post-LN or pre-LN."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encdec.config import ConfigError, ModelConfig
from encdec.data.vocab import PAD
from encdec.models.base import DecoderState, EncoderOut
from encdec.nn.attention import MultiHeadAttention
from encdec.nn.dropout import residual_dropout
from encdec.nn.layers import Embedding, FeedForward, Positions
from encdec.nn.norms import make_norm


class Sublayer(nn.Module):
    """Residual connection around a sublayer, normalization before it (pre) or after the sum
    (post). ``pad_mask`` (B, T) marks real positions (BatchNorm's statistics use only those)."""

    def __init__(self, d_model: int, dropout: float, pre_norm: bool, norm_type: str = "layernorm"):
        super().__init__()
        self.norm = make_norm(norm_type, d_model)
        self.dropout = dropout
        self.pre_norm = pre_norm

    def forward(self, x: torch.Tensor, fn, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            return residual_dropout(x, fn(self.norm(x, pad_mask)), self.dropout, self.training)
        return self.norm(residual_dropout(x, fn(x), self.dropout, self.training), pad_mask)


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
        x = self.attn_sub(x, lambda h: self.self_attn(h, attn_mask=mask)[0], pad_mask)
        return self.ffn_sub(x, self.ffn, pad_mask)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        pre = cfg.norm == "pre"
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout, cross=True)
        self.ffn = FeedForward(cfg.d_model, cfg.ffn_dim, cfg.activation, cfg.activation_dropout)
        self.self_sub = Sublayer(cfg.d_model, cfg.dropout, pre, cfg.norm_type)
        self.cross_sub = Sublayer(cfg.d_model, cfg.dropout, pre, cfg.norm_type)
        self.ffn_sub = Sublayer(cfg.d_model, cfg.dropout, pre, cfg.norm_type)

    def forward(self, x, memory, memory_mask, cache: dict | None = None, need_attention=False,
                causal: bool = True, self_mask: torch.Tensor | None = None,
                pad_mask: torch.Tensor | None = None, memory_keys: torch.Tensor | None = None):
        """Teacher-forced (cache None, causal over all of x) or one incremental step (cache).

        ``memory_keys`` (B, S, d): what the cross-attention keys are projected from, when not
        ``memory`` (a cache holds its projected keys already).

        ``causal=False`` with ``self_mask`` (B, 1, 1, T) lets every position see every real
        target position: the non-autoregressive decoder.
        """
        causal = causal and cache is None
        self_cache = cache["self"] if cache is not None else None
        x = self.self_sub(x, lambda h: self.self_attn(h, attn_mask=self_mask,
                                                      is_causal=causal and h.size(1) > 1,
                                                      cache=self_cache)[0], pad_mask)
        weights = None

        def cross(h):
            nonlocal weights
            if cache is None:
                out, weights = self.cross_attn(h, memory, attn_mask=memory_mask,
                                               need_weights=need_attention,
                                               memory_keys=memory_keys)
                return out
            out, weights = self._cached_cross(h, cache, memory_mask, need_attention)
            return out

        x = self.cross_sub(x, cross, pad_mask)
        return self.ffn_sub(x, self.ffn, pad_mask), weights

    def _cached_cross(self, h, cache, memory_mask, need_attention):
        # Rows of one group (e.g. the beams of one input) share the projected memory: fold
        # them into the query-length axis so no K/V copy per beam is needed.
        k, v = cache["cross_k"], cache["cross_v"]  # (G, nh, S, hd)
        G = k.size(0)
        N, T, d = h.shape
        q_in = h.reshape(G, (N // G) * T, d)
        out, weights = self.cross_attn(q_in, attn_mask=memory_mask, cache={"k": k, "v": v},
                                       need_weights=need_attention)
        if weights is not None:
            # (G, nh, K*T, S) -> (N, nh, T, S), the layout of the uncached path
            weights = weights.view(G, -1, N // G, T, k.size(2)).transpose(1, 2).reshape(N, -1, T, k.size(2))
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
            layers.append({"self": {}, "cross_k": k, "cross_v": v})
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
            x, weights = layer(x, None, mask, cache=state.layers[i],
                               need_attention=need_attention and last)
        state.step += 1
        logits = self.output(self._final_norm(x)[:, 0])  # (N, V)
        attention = weights.mean(dim=1)[:, 0] if weights is not None else None  # (N, S)
        return F.log_softmax(logits.float(), dim=-1), attention

    def reorder_state(self, state: DecoderState, index: torch.Tensor,
                      group_size: int | None = None) -> DecoderState:
        new_group = group_size or state.group_size
        # The input of each new group is the input of its first row (rows never mix inputs).
        groups = index.view(-1, new_group)[:, 0] // state.group_size
        same_groups = groups.numel() == state.memory_mask.size(0) and bool(
            (groups == torch.arange(groups.numel(), device=groups.device)).all())
        for cache in state.layers:
            for key in ("k", "v"):
                if key in cache["self"]:
                    cache["self"][key] = cache["self"][key].index_select(0, index)
            if not same_groups:
                cache["cross_k"] = cache["cross_k"].index_select(0, groups)
                cache["cross_v"] = cache["cross_v"].index_select(0, groups)
        if not same_groups:
            state.memory_mask = state.memory_mask.index_select(0, groups)
        state.group_size = new_group
        return state
