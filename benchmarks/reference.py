"""The in-script reference: a plain ``torch.nn.Transformer`` built to match an encdec model.

Matched to encdec's Transformer (``encdec/models/transformer.py``), so that a benchmark
compares implementations, not models:

* the same size, pre-/post-LN, sinusoidal positions, token embeddings scaled by sqrt(d_model)
  and dropout on embeddings and on every sublayer output (``model.dropout``);
* dropout placement: ``nn.Transformer`` also drops attention probabilities and the FFN
  activation with its one ``dropout``; here those take ``model.attention_dropout`` and
  ``model.activation_dropout`` (0 by default, as in encdec) instead;
* parameters: source/target embeddings shared when ``model.share_embeddings``, the output layer
  tied to the target embedding when ``model.tie_output``; ``load_encdec`` copies an encdec
  model's weights (pre-LN only: ``nn.Transformer`` always ends its stacks with a LayerNorm);
* masks: key padding on the source only when a batch has padding, causal decoder
  self-attention without a target padding mask (padding is after every real position);
* the loss projects only the real target positions, as ``encdec.losses.sequence_loss`` does.

Decoding (``greedy``, ``beam``; pre-LN) is a plain incremental loop on the same weights: per-layer
self-attention key/value caches, cross-attention keys/values projected once per input, finished
inputs leaving the batch, and the attention product written out on CPU as encdec does there
(SDPA elsewhere). Beam search follows ``encdec/decoding/beam.py`` (first step from one row,
2K candidates, EOS within the first K finishes with score / length**length_penalty, forced EOS
at a * len(src) + b tokens), so both give the same outputs on the same weights.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from encdec.data.vocab import BOS, EOS, PAD
from encdec.nn.layers import sinusoidal_table


class ReferenceTransformer(nn.Module):
    def __init__(self, cfg, src_vocab: int, tgt_vocab: int):
        super().__init__()
        if cfg.positions != "sinusoidal" or cfg.norm_type != "layernorm":
            raise ValueError("the reference covers sinusoidal positions and LayerNorm only")
        self.d, self.n_heads = cfg.d_model, cfg.n_heads
        self.src_embed = nn.Embedding(src_vocab, cfg.d_model, padding_idx=PAD)
        self.tgt_embed = self.src_embed if cfg.share_embeddings else \
            nn.Embedding(tgt_vocab, cfg.d_model, padding_idx=PAD)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        with warnings.catch_warnings():  # "enable_nested_tensor ... norm_first": inference only
            warnings.simplefilter("ignore")
            self.core = nn.Transformer(cfg.d_model, cfg.n_heads, cfg.enc_layers, cfg.dec_layers,
                                       cfg.ffn_dim, cfg.dropout, activation=cfg.activation,
                                       batch_first=True, norm_first=cfg.norm == "pre")
        # nn.Transformer's one `dropout` also acts on attention probabilities and after the
        # FFN activation; encdec has separate settings for those (0 by default).
        for layer in [*self.core.encoder.layers, *self.core.decoder.layers]:
            for attn in (layer.self_attn, getattr(layer, "multihead_attn", None)):
                if attn is not None:
                    attn.dropout = cfg.attention_dropout
            layer.dropout = nn.Dropout(cfg.activation_dropout) if cfg.activation_dropout \
                else nn.Identity()
        self.output = nn.Linear(cfg.d_model, tgt_vocab, bias=False)
        if cfg.tie_output:
            self.output.weight = self.tgt_embed.weight
        self.register_buffer("pos", sinusoidal_table(1024, cfg.d_model), persistent=False)

    def embed(self, table, tokens, offset: int = 0):
        x = table(tokens) * self.d ** 0.5 + self.pos[offset:offset + tokens.size(1)]
        return self.embed_dropout(x)

    def encode(self, src):
        pad = src.eq(PAD)
        return self.core.encoder(self.embed(self.src_embed, src),
                                 src_key_padding_mask=pad if bool(pad.any()) else None)

    def forward(self, src, tgt_in):
        """Decoder hidden states (B, T, d)."""
        T = tgt_in.size(1)
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=src.device)
        return self.core.decoder(self.embed(self.tgt_embed, tgt_in), self.encode(src),
                                 tgt_mask=causal, tgt_is_causal=True,
                                 memory_key_padding_mask=src.eq(PAD))

    def loss(self, batch, smoothing):
        hidden = self(batch.src_tokens, batch.tgt_in)
        keep = batch.tgt_out.ne(PAD)
        logits = self.output(hidden[keep])  # real target positions only
        return F.cross_entropy(logits.float(), batch.tgt_out[keep], label_smoothing=smoothing,
                               reduction="sum")

    # ---- incremental decoding ------------------------------------------------------------
    def _heads(self, x):
        B, T, _ = x.shape
        return x.view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, nh, T, hd)

    def _start(self, src):
        """Additive source mask (B, 1, 1, S) and per-layer caches holding the cross-attention
        keys/values of the encoder output. Decoding covers pre-LN models (see load_encdec)."""
        if not self.core.decoder.layers[0].norm_first:
            raise ValueError("the reference decodes pre-LN models only")
        memory = self.encode(src)
        mask = torch.zeros(src.shape, device=src.device).masked_fill(src.eq(PAD), float("-inf"))
        caches = []
        for layer in self.core.decoder.layers:
            mha = layer.multihead_attn
            k, v = F.linear(memory, mha.in_proj_weight[self.d:], mha.in_proj_bias[self.d:]).chunk(2, -1)
            caches.append({"cross_k": self._heads(k), "cross_v": self._heads(v)})
        return mask[:, None, None, :], caches

    def _attend(self, q, k, v, mask=None):
        if q.device.type != "cpu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        scores = (q * (1.0 / math.sqrt(q.size(-1)))) @ k.transpose(-2, -1)  # (N, nh, 1, S)
        if mask is not None:
            scores = scores + mask
        return scores.softmax(-1) @ v

    def _self_attn(self, sa, h, cache):
        """One step of masked self-attention: this position's key/value joins the cache."""
        N = h.size(0)
        q, k, v = (self._heads(p) for p in F.linear(h, sa.in_proj_weight, sa.in_proj_bias).chunk(3, -1))
        if "k" in cache:
            k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)  # (N, nh, t+1, hd)
        cache["k"], cache["v"] = k, v
        return sa.out_proj(self._attend(q, k, v).transpose(1, 2).reshape(N, 1, self.d))

    def _cross_attn(self, ca, h, cache, mask):
        """Cross-attention on the keys/values projected once in ``_start``."""
        N = h.size(0)
        q = self._heads(F.linear(h, ca.in_proj_weight[:self.d], ca.in_proj_bias[:self.d]))
        out = self._attend(q, cache["cross_k"], cache["cross_v"], mask)  # (N, nh, 1, hd)
        return ca.out_proj(out.transpose(1, 2).reshape(N, 1, self.d))

    def _step(self, prev, caches, mask, t):
        """Logits (N, V) of the token after ``prev`` (N,), the token at position t (pre-LN)."""
        x = self.embed(self.tgt_embed, prev[:, None], offset=t)  # (N, 1, d)
        for layer, cache in zip(self.core.decoder.layers, caches):
            x = x + self._self_attn(layer.self_attn, layer.norm1(x), cache)
            x = x + self._cross_attn(layer.multihead_attn, layer.norm2(x), cache, mask)
            x = x + layer.linear2(layer.activation(layer.linear1(layer.norm3(x))))
        return self.output(self.core.decoder.norm(x)[:, 0])

    @staticmethod
    def _reorder(caches, mask, rows, cross_rows):
        """Keep/reorder decoder rows: self-attention caches by ``rows`` (into the current rows),
        cross-attention K/V and the source mask by ``cross_rows`` (None: unchanged)."""
        for c in caches:
            if "k" in c:
                c["k"], c["v"] = c["k"].index_select(0, rows), c["v"].index_select(0, rows)
            if cross_rows is not None:
                c["cross_k"] = c["cross_k"].index_select(0, cross_rows)
                c["cross_v"] = c["cross_v"].index_select(0, cross_rows)
        return mask if cross_rows is None else mask.index_select(0, cross_rows)

    @staticmethod
    def _limits(src, a: float, b: int):
        """Most output tokens (EOS included) per input: a * len(src) + b, at least 1."""
        return (a * src.ne(PAD).sum(1).float() + b).floor().long().clamp(min=1)

    @torch.inference_mode()
    def greedy(self, src, max_len_a: float, max_len_b: int) -> list[list[int]]:
        """Output ids per input (EOS excluded)."""
        dev = src.device
        mask, caches = self._start(src)
        limit = self._limits(src, max_len_a, max_len_b)
        steps = int(limit.max())
        out = torch.full((src.size(0), steps), EOS, dtype=torch.long)
        alive = torch.arange(src.size(0), device=dev)  # original input of each row
        prev = torch.full((src.size(0),), BOS, dtype=torch.long, device=dev)
        for t in range(steps):
            logits = self._step(prev, caches, mask, t)
            logits[:, [PAD, BOS]] = float("-inf")  # never output tokens
            nxt = logits.argmax(-1).masked_fill(limit[alive] <= t + 1, EOS)
            out[alive.cpu(), t] = nxt.cpu()
            going = nxt.ne(EOS)
            if not bool(going.all()):
                if not bool(going.any()):
                    break
                rows = going.nonzero().squeeze(1)
                mask = self._reorder(caches, mask, rows, rows)
                alive, nxt = alive[rows], nxt[rows]
            prev = nxt
        return [row[: row.index(EOS)] if EOS in row else row for row in out.tolist()]

    @torch.inference_mode()
    def beam(self, src, beam_size: int, length_penalty: float, max_len_a: float,
             max_len_b: int) -> list[list[int]]:
        """The best hypothesis per input (ids, EOS excluded), by encdec's beam search rules."""
        K, B, dev = beam_size, src.size(0), src.device
        mask, caches = self._start(src)  # cross K/V: one row per input until the first step
        limit = self._limits(src, max_len_a, max_len_b)
        best: list[tuple[float, list[int]] | None] = [None] * B
        n_done = [0] * B
        alive = torch.arange(B, device=dev)  # original input of each group (of `width` rows)
        scores = torch.zeros(B, 1, device=dev)  # (G, width)
        tokens = torch.empty(B, 0, dtype=torch.long, device=dev)  # (G * width, t)
        prev = torch.full((B,), BOS, dtype=torch.long, device=dev)
        width, t = 1, 0
        while True:
            G = alive.numel()
            lp = F.log_softmax(self._step(prev, caches, mask, t).float(), -1)  # (G * width, V)
            lp[:, [PAD, BOS]] = float("-inf")
            at_limit = (limit[alive] <= t + 1).repeat_interleave(width)
            if bool(at_limit.any()):  # only EOS may follow
                only_eos = torch.full_like(lp, float("-inf"))
                only_eos[:, EOS] = lp[:, EOS]
                lp = torch.where(at_limit[:, None], only_eos, lp)
            V = lp.size(1)
            cand = (scores[:, :, None] + lp.view(G, width, V)).view(G, width * V)
            top, ids = cand.topk(min(2 * K, width * V), dim=1)  # (G, 2K)
            beam, tok = ids // V, ids % V
            is_eos = tok.eq(EOS) & top.isfinite()
            for g, j in is_eos[:, :K].nonzero().tolist():  # EOS within the first K: finished
                b = int(alive[g])
                if n_done[b] < K:
                    n_done[b] += 1
                    score = float(top[g, j]) / (t + 1) ** length_penalty
                    if best[b] is None or score > best[b][0]:
                        best[b] = (score, tokens[g * width + int(beam[g, j])].tolist())
            scores, pos = top.masked_fill(is_eos, float("-inf")).topk(K, dim=1)  # (G, K)
            rows = (torch.arange(G, device=dev)[:, None] * width + beam.gather(1, pos)).view(-1)
            tok = tok.gather(1, pos)
            going = scores.isfinite().any(1) & torch.tensor(
                [n_done[b] < K for b in alive.tolist()], device=dev)
            if not bool(going.any()):
                break
            groups = going.nonzero().squeeze(1)
            if groups.numel() < G:  # finished inputs leave the batch
                alive, scores, tok = alive[groups], scores[groups], tok[groups]
                rows = rows.view(G, K)[groups].view(-1)
            # Cross K/V: copied to the K beams of an input once (first step), then selected
            # again only when inputs leave (beams of one input share the same values).
            cross_rows = None if width == K and groups.numel() == G \
                else (groups * width).repeat_interleave(K)
            mask = self._reorder(caches, mask, rows, cross_rows)
            tokens = torch.cat([tokens.index_select(0, rows), tok.view(-1, 1)], 1)
            prev, width, t = tok.view(-1), K, t + 1
        return [b[1] if b is not None else [] for b in best]

    # ---- weights -------------------------------------------------------------------------
    def load_encdec(self, model):
        """Copy a pre-LN encdec Transformer's weights into this module (nn.Transformer always
        ends its stacks with a LayerNorm, which only pre-LN encdec models have)."""
        if model.cfg.norm != "pre":
            raise ValueError("the reference can carry the weights of pre-LN models only")
        sd = {}
        sd["src_embed.weight"] = model.src_embed.tokens.weight
        sd["tgt_embed.weight"] = model.tgt_embed.tokens.weight
        for i, layer in enumerate(model.encoder):
            p = f"core.encoder.layers.{i}."
            _self_attn(sd, p, layer.self_attn)
            _ffn_norms(sd, p, layer.ffn, [layer.attn_sub.norm, layer.ffn_sub.norm])
        for i, layer in enumerate(model.decoder):
            p = f"core.decoder.layers.{i}."
            _self_attn(sd, p, layer.self_attn)
            ca = layer.cross_attn
            sd[p + "multihead_attn.in_proj_weight"] = torch.cat([ca.q_proj.weight, ca.kv_proj.weight])
            sd[p + "multihead_attn.in_proj_bias"] = torch.cat([ca.q_proj.bias, ca.kv_proj.bias])
            sd[p + "multihead_attn.out_proj.weight"] = ca.out_proj.weight
            sd[p + "multihead_attn.out_proj.bias"] = ca.out_proj.bias
            _ffn_norms(sd, p, layer.ffn, [layer.self_sub.norm, layer.cross_sub.norm, layer.ffn_sub.norm])
        for side, norm in (("encoder", model.enc_norm), ("decoder", model.dec_norm)):
            sd[f"core.{side}.norm.weight"] = norm.weight
            sd[f"core.{side}.norm.bias"] = norm.bias
        sd["output.weight"] = model.output.weight
        self.load_state_dict({k: v.detach().clone() for k, v in sd.items()}, strict=True)
        return self


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied weight counts once)."""
    return sum(p.numel() for p in model.parameters())


def _self_attn(sd, p, attn):
    sd[p + "self_attn.in_proj_weight"] = attn.qkv_proj.weight
    sd[p + "self_attn.in_proj_bias"] = attn.qkv_proj.bias
    sd[p + "self_attn.out_proj.weight"] = attn.out_proj.weight
    sd[p + "self_attn.out_proj.bias"] = attn.out_proj.bias


def _ffn_norms(sd, p, ffn, norms):
    sd[p + "linear1.weight"], sd[p + "linear1.bias"] = ffn.fc1.weight, ffn.fc1.bias
    sd[p + "linear2.weight"], sd[p + "linear2.bias"] = ffn.fc2.weight, ffn.fc2.bias
    for j, norm in enumerate(norms, 1):
        sd[p + f"norm{j}.weight"], sd[p + f"norm{j}.bias"] = norm.weight, norm.bias
