"""Non-autoregressive text-to-speech (FastSpeech-style) with durations learned without an
external aligner.

Tokens (phonemes or characters) -> Transformer encoder -> durations -> length regulator ->
Transformer decoder over frames -> mel frames (+ a convolutional post-net).

Where durations come from, in training (``align`` = "joint", the default): an alignment
module scores every (frame, token) pair by the negative squared distance between a
convolutional encoding of the target frames and one of the token embeddings; the soft
alignment (a softmax over tokens per frame) is trained with the forward-sum loss over monotonic
paths, its best monotonic path (MAS) gives hard durations, and a binarization loss pulls the
soft alignment toward that path once it is switched on (``binarize``). The decoder is trained
on the hard durations, the duration predictor on their logarithm, all jointly. Durations can
instead be given (``durations=``, e.g. read off an autoregressive model's attention): then the
alignment module is not used.

At inference the predicted log-durations are exponentiated, multiplied by ``length_scale``
(the speaking-rate knob: 1.2 = 20 % slower) and by per-token factors when given, and rounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from encdec.config import ModelConfig
from encdec.data.vocab import PAD
from encdec.models.transformer import EncoderLayer
from encdec.nn.alignment import (binarization_loss, durations as hard_durations,
                                 forward_sum_loss, length_regulate, monotonic_alignment_search)
from encdec.nn.layers import Embedding, Positions
from encdec.nn.norms import make_norm


def lengths_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) True at real positions."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


class ConvStack(nn.Module):
    """Conv1d -> ReLU -> LayerNorm -> dropout, ``layers`` times, over (B, T, C) with a mask."""

    def __init__(self, d_in: int, d_hidden: int, layers: int, kernel: int, dropout: float):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(d_in if i == 0 else d_hidden, d_hidden, kernel,
                                             padding=kernel // 2) for i in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d_hidden) for _ in range(layers))
        self.dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[..., None].to(x.dtype)
        for conv, norm in zip(self.convs, self.norms):
            x = conv((x * m).transpose(1, 2)).transpose(1, 2)
            x = F.dropout(norm(F.relu(x)), self.dropout, self.training)
        return x * m


class AlignmentModule(nn.Module):
    """Soft alignment log-probabilities (B, T, N) of frames to tokens: a log-softmax over tokens
    of -temperature * |query(frame) - key(token)|^2."""

    def __init__(self, d_text: int, n_mels: int, d_align: int = 80, temperature: float = 5e-4):
        super().__init__()
        self.key = nn.Sequential(nn.Conv1d(d_text, 2 * d_text, 3, padding=1), nn.ReLU(),
                                 nn.Conv1d(2 * d_text, d_align, 1))
        self.query = nn.Sequential(nn.Conv1d(n_mels, 2 * n_mels, 3, padding=1), nn.ReLU(),
                                   nn.Conv1d(2 * n_mels, n_mels, 1), nn.ReLU(),
                                   nn.Conv1d(n_mels, d_align, 1))
        self.temperature = temperature

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, mels: torch.Tensor):
        k = self.key(text.transpose(1, 2))  # (B, A, N)
        q = self.query(mels.transpose(1, 2))  # (B, A, T)
        dist = (q[:, :, :, None] - k[:, :, None, :]).square().sum(dim=1)  # (B, T, N)
        scores = -self.temperature * dist
        scores = scores.masked_fill(~text_mask[:, None, :], float("-inf"))
        return scores.log_softmax(dim=-1)


@dataclass
class TTSOutput:
    mels: torch.Tensor  # (B, T, n_mels) after the post-net
    frame_lengths: torch.Tensor  # (B,)
    durations: torch.Tensor  # (B, N) frames per token
    alignment: torch.Tensor | None = None  # (B, T, N) soft alignment (training, joint)


class FastSpeech(nn.Module):
    """Tokens -> mel frames in one pass. Dimensions: B batch, N tokens, T frames, M mel bins."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, n_mels: int = 80,
                 predictor_channels: int = 256, postnet_layers: int = 5):
        super().__init__()
        self.cfg = cfg
        self.n_mels = n_mels
        positions = Positions(cfg.positions, cfg.d_model, cfg.max_positions)
        self.embed = Embedding(vocab_size, cfg.d_model, positions, cfg.dropout)
        self.frame_positions = positions
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.dec_layers))
        pre = cfg.norm == "pre"
        self.enc_norm = make_norm(cfg.norm_type, cfg.d_model) if pre else None
        self.dec_norm = make_norm(cfg.norm_type, cfg.d_model) if pre else None
        self.duration_predictor = ConvStack(cfg.d_model, predictor_channels, 2, 3, cfg.dropout)
        self.duration_out = nn.Linear(predictor_channels, 1)
        self.aligner = AlignmentModule(cfg.d_model, n_mels)
        self.mel_out = nn.Linear(cfg.d_model, n_mels)
        self.postnet = ConvStack(n_mels, 256, postnet_layers - 1, 5, cfg.dropout) \
            if postnet_layers > 1 else None
        self.postnet_out = nn.Linear(256, n_mels) if postnet_layers > 1 else None

    # ---- pieces -------------------------------------------------------------------------
    def _stack(self, layers, norm, x, mask):
        attn_mask = None if bool(mask.all()) else mask[:, None, None, :]
        for layer in layers:
            x = layer(x, attn_mask, mask)
        return norm(x, mask) if norm is not None else x

    def encode(self, tokens: torch.Tensor):
        mask = tokens.ne(PAD)
        return self._stack(self.encoder, self.enc_norm, self.embed(tokens), mask), mask

    def predict_log_durations(self, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N) predicted log(1 + frames) per token."""
        h = self.duration_predictor(memory.detach(), mask)
        return self.duration_out(h).squeeze(-1).masked_fill(~mask, 0.0)

    def decode(self, memory: torch.Tensor, durations: torch.Tensor, max_frames: int | None = None):
        frames, frame_lengths = length_regulate(memory, durations, max_frames)
        frame_mask = lengths_mask(frame_lengths, frames.size(1))
        x = frames + self.frame_positions(frames.size(1))[None]
        x = self._stack(self.decoder, self.dec_norm, x, frame_mask)
        before = self.mel_out(x)
        after = before
        if self.postnet is not None:
            after = before + self.postnet_out(self.postnet(before, frame_mask))
        m = frame_mask[..., None]
        return before.masked_fill(~m, 0.0), after.masked_fill(~m, 0.0), frame_lengths

    # ---- training -----------------------------------------------------------------------
    def loss(self, tokens: torch.Tensor, mels: torch.Tensor, mel_lengths: torch.Tensor,
             durations: torch.Tensor | None = None, binarize: bool = True,
             align_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
        """Total training loss and its parts. ``mels`` (B, T, M) are the normalized targets;
        ``durations`` (B, N), when given, replace the learned alignment."""
        memory, mask = self.encode(tokens)
        text_lengths = mask.sum(dim=1)
        parts = {}
        total = memory.new_zeros(())
        if durations is None:
            log_align = self.aligner(memory, mask, mels)
            hard = monotonic_alignment_search(log_align, text_lengths, mel_lengths)
            durations = hard_durations(hard)
            parts["forward_sum"] = forward_sum_loss(log_align, text_lengths, mel_lengths)
            total = total + align_weight * parts["forward_sum"]
            if binarize:
                parts["binarization"] = binarization_loss(hard, log_align)
                total = total + align_weight * parts["binarization"]
        log_pred = self.predict_log_durations(memory, mask)
        target = torch.log1p(durations.float())
        parts["duration"] = F.mse_loss(log_pred[mask], target[mask])
        before, after, _ = self.decode(memory, durations, max_frames=mels.size(1))
        frame_mask = lengths_mask(mel_lengths, mels.size(1))[..., None].expand_as(mels)
        parts["mel"] = F.l1_loss(before[frame_mask], mels[frame_mask])
        parts["postnet"] = F.l1_loss(after[frame_mask], mels[frame_mask])
        total = total + parts["duration"] + parts["mel"] + parts["postnet"]
        return total, {k: float(v.detach()) for k, v in parts.items()} | {"durations": durations}

    # ---- inference ----------------------------------------------------------------------
    @torch.no_grad()
    def synthesize(self, tokens: torch.Tensor, length_scale: float = 1.0,
                   token_scales: torch.Tensor | None = None,
                   durations: torch.Tensor | None = None) -> TTSOutput:
        """Mel frames for padded ``tokens`` (B, N). ``length_scale`` multiplies every predicted
        duration, ``token_scales`` (B, N) each token's; ``durations`` (B, N) overrides them."""
        memory, mask = self.encode(tokens)
        if durations is None:
            frames = torch.expm1(self.predict_log_durations(memory, mask)).clamp(min=0)
            frames = frames * length_scale
            if token_scales is not None:
                frames = frames * token_scales
            durations = frames.round().long().clamp(min=1).masked_fill(~mask, 0)
        _, after, frame_lengths = self.decode(memory, durations)
        return TTSOutput(after, frame_lengths, durations)
