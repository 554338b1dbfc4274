"""Non-autoregressive Transformer (CMLM, Ghazvininejad et al., 2019; GLAT, Qian et al., 2021).

The encoder, embeddings and decoder layers are those of ``TransformerSeq2Seq``. The decoder
has no causal mask: every target position sees every other, and its input at a position is
either the target token (observed) or one learned [MASK] vector. A length predictor, a
classifier over the offset ``len(target) - len(source)`` in [-length_offset, length_offset],
reads the mean of the encoder output. Output has no EOS: the predicted length decides.

Training objectives are in ``encdec.losses`` (``nat_loss``); decoding (single pass and
Mask-Predict) in ``encdec.decoding.nat``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encdec.config import ModelConfig
from encdec.data.vocab import PAD
from encdec.models.base import EncoderOut
from encdec.models.transformer import TransformerSeq2Seq
from encdec.nn.attention import KVCache


class NATransformer(TransformerSeq2Seq):
    non_autoregressive = True

    def __init__(self, cfg: ModelConfig, src_vocab_size: int, tgt_vocab_size: int):
        super().__init__(cfg, src_vocab_size, tgt_vocab_size)
        self.mask_embed = nn.Parameter(torch.randn(cfg.d_model) * cfg.d_model ** -0.5)
        self.length_offset = cfg.length_offset
        self.length_head = nn.Linear(cfg.d_model, 2 * cfg.length_offset + 1)
        nn.init.xavier_uniform_(self.length_head.weight)
        nn.init.zeros_(self.length_head.bias)

    # ---- length --------------------------------------------------------------------------
    def length_logits(self, encoder_out: EncoderOut) -> torch.Tensor:
        """(B, 2 * length_offset + 1) scores; class c means target length = source length + c - n."""
        keep = encoder_out.memory_mask.unsqueeze(-1).to(encoder_out.memory.dtype)  # (B, S, 1)
        pooled = (encoder_out.memory * keep).sum(1) / keep.sum(1).clamp(min=1)  # (B, d)
        return self.length_head(pooled)

    def length_classes(self, encoder_out: EncoderOut, tgt_lengths: torch.Tensor) -> torch.Tensor:
        """The class of each target length (offsets outside the range are clipped)."""
        src_lengths = encoder_out.memory_mask.sum(1)
        n = self.length_offset
        return (tgt_lengths - src_lengths).clamp(-n, n) + n

    def lengths_of_classes(self, encoder_out: EncoderOut, classes: torch.Tensor) -> torch.Tensor:
        """Target lengths for classes (B, L)."""
        src_lengths = encoder_out.memory_mask.sum(1, keepdim=True)
        return src_lengths + classes - self.length_offset

    # ---- parallel decoder ----------------------------------------------------------------
    def project_memory(self, encoder_out: EncoderOut) -> list[KVCache]:
        """Each decoder layer's cross-attention keys and values of the encoder output: computed
        once per input and reused by every Mask-Predict pass and every candidate length."""
        return [KVCache(*layer.cross_attn.project_memory(encoder_out.memory))
                for layer in self.decoder]

    def decode_parallel(self, tgt_tokens: torch.Tensor, observed: torch.Tensor,
                        encoder_out: EncoderOut, need_attention: bool = False,
                        memory: list[KVCache] | None = None):
        """Hidden states (N, T, d) for all positions at once, and last-layer cross-attention.

        tgt_tokens (N, T): PAD beyond each row's length; elsewhere the token, read only where
        ``observed`` (N, T) is True — other positions get the [MASK] vector.
        Without ``memory``, encoder_out has N rows. With ``memory`` (``project_memory`` of an
        encoder output of G rows), encoder_out is that output and rows come in G groups of
        N / G consecutive rows (e.g. the candidate lengths of one input) sharing its memory.
        """
        real = tgt_tokens.ne(PAD)  # (N, T)
        shown = tgt_tokens.masked_fill(~observed, PAD)  # PAD's embedding is zero
        emb = self.tgt_embed
        x = emb.tokens(shown) * emb.scale + emb.positions(tgt_tokens.size(1))
        x = x + (real & ~observed).unsqueeze(-1).to(x.dtype) * self.mask_embed
        x = emb.dropout(x)
        self_mask = real[:, None, None, :]  # (N, 1, 1, T): padding is never attended to
        memory_mask = encoder_out.memory_mask[:, None, None, :]
        weights = None
        for i, layer in enumerate(self.decoder):
            last = i == len(self.decoder) - 1
            x, weights = layer.parallel(x, self_mask, encoder_out.memory, memory_mask, real,
                                        cross=None if memory is None else memory[i],
                                        need_attention=need_attention and last)
        if weights is not None:
            weights = weights.mean(dim=1)  # (N, T, S)
        return self._final_norm(x, real), weights

    def forward(self, src_tokens: torch.Tensor, tgt_tokens: torch.Tensor,
                observed: torch.Tensor):
        """Training: decoder hidden states (B, T, d) and length scores (B, C)."""
        encoder_out = self.encode(src_tokens)
        hidden, _ = self.decode_parallel(tgt_tokens, observed, encoder_out)
        return hidden, self.length_logits(encoder_out)

    # ---- no left-to-right decoding -------------------------------------------------------
    def init_state(self, encoder_out, group_size: int = 1):
        raise NotImplementedError("a non-autoregressive model decodes with method nat "
                                  "(--method nat), not greedy, beam or sampling")

    decode_step = init_state

    def length_log_probs(self, encoder_out: EncoderOut) -> torch.Tensor:
        return F.log_softmax(self.length_logits(encoder_out).float(), dim=-1)
