"""The in-script reference: a plain ``torch.nn.Transformer`` with the same size, embeddings and
output projection as an encdec model, optionally carrying an encdec model's weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encdec.data.vocab import BOS, EOS, PAD
from encdec.nn.layers import sinusoidal_table


class ReferenceTransformer(nn.Module):
    def __init__(self, cfg, src_vocab: int, tgt_vocab: int):
        super().__init__()
        self.d = cfg.d_model
        self.src_embed = nn.Embedding(src_vocab, cfg.d_model, padding_idx=PAD)
        self.tgt_embed = nn.Embedding(tgt_vocab, cfg.d_model, padding_idx=PAD)
        self.core = nn.Transformer(cfg.d_model, cfg.n_heads, cfg.enc_layers, cfg.dec_layers,
                                   cfg.ffn_dim, cfg.dropout, batch_first=True,
                                   norm_first=cfg.norm == "pre")
        self.output = nn.Linear(cfg.d_model, tgt_vocab, bias=False)
        self.output.weight = self.tgt_embed.weight
        self.register_buffer("pos", sinusoidal_table(1024, cfg.d_model), persistent=False)

    def embed(self, table, tokens):
        return table(tokens) * self.d ** 0.5 + self.pos[: tokens.size(1)]

    def forward(self, src, tgt_in):
        T = tgt_in.size(1)
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=src.device,
                                                                dtype=torch.float32)
        h = self.core(self.embed(self.src_embed, src), self.embed(self.tgt_embed, tgt_in),
                      tgt_mask=causal, src_key_padding_mask=src.eq(PAD),
                      tgt_key_padding_mask=tgt_in.eq(PAD), memory_key_padding_mask=src.eq(PAD),
                      tgt_is_causal=True)
        return self.output(h)

    def loss(self, batch, smoothing):
        logits = self(batch.src_tokens, batch.tgt_in)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), batch.tgt_out.view(-1),
                               ignore_index=PAD, label_smoothing=smoothing, reduction="sum")

    @torch.inference_mode()
    def greedy(self, src, max_len):
        """Tutorial-style greedy decoding: the whole decoder re-run at every step."""
        memory = self.core.encoder(self.embed(self.src_embed, src), src_key_padding_mask=src.eq(PAD))
        ys = torch.full((src.size(0), 1), BOS, dtype=torch.long)
        done = torch.zeros(src.size(0), dtype=torch.bool)
        for _ in range(max_len):
            T = ys.size(1)
            causal = nn.Transformer.generate_square_subsequent_mask(T, device=src.device,
                                                                dtype=torch.float32)
            h = self.core.decoder(self.embed(self.tgt_embed, ys), memory, tgt_mask=causal,
                                  memory_key_padding_mask=src.eq(PAD), tgt_is_causal=True)
            logits = self.output(h[:, -1])
            logits[:, [PAD, BOS]] = float("-inf")  # never output tokens
            nxt = logits.argmax(-1)
            nxt = nxt.masked_fill(done, PAD)
            ys = torch.cat([ys, nxt[:, None]], dim=1)
            done |= nxt.eq(EOS)
            if done.all():
                break
        return ys[:, 1:]

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
