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
from encdec.models.transformer import DecoderLayer, EncoderLayer, LayerCache
from encdec.nn.alignment import (beta_binomial_prior, binarization_loss,
                                 durations as hard_durations, forward_sum_loss, length_regulate,
                                 monotonic_alignment_search)
from encdec.nn.attention import KVCache
from encdec.nn.dropout import dropout
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
            x = dropout(norm(F.relu(x)), self.dropout, self.training)
        return x * m


class AlignmentModule(nn.Module):
    """Soft alignment log-probabilities (B, T, N) of frames to tokens: a log-softmax over tokens
    of -sharpness * |q - k|^2 for the unit vectors q = query(frame) / |query(frame)| and
    k = key(token) / |key(token)|.

    On unnormalized vectors (as in RAD-TTS, with a temperature) the distance carries a per-token
    offset |k|^2: on bible-tts the keys grew to norms near 100 while most queries shrank toward
    0, so every frame went to the token with the smallest key, and the alignment never learned
    content (worse than equal durations against flite's phone times). Unit vectors leave only
    the direction, and ``sharpness`` bounds the scores to [-4 sharpness, 0]."""

    def __init__(self, d_text: int, n_mels: int, d_align: int = 80, sharpness: float = 10.0,
                 prior: float = 1.0):
        super().__init__()
        self.key = nn.Sequential(nn.Conv1d(d_text, 2 * d_text, 3, padding=1), nn.ReLU(),
                                 nn.Conv1d(2 * d_text, d_align, 1))
        self.query = nn.Sequential(nn.Conv1d(n_mels, 2 * n_mels, 3, padding=1), nn.ReLU(),
                                   nn.Conv1d(2 * n_mels, n_mels, 1), nn.ReLU(),
                                   nn.Conv1d(n_mels, d_align, 1))
        self.sharpness = sharpness
        self.prior = prior

    def forward(self, text: torch.Tensor, text_mask: torch.Tensor, mels: torch.Tensor,
                frame_lengths: torch.Tensor | None = None):
        """With ``frame_lengths`` and ``prior`` > 0 the log-probabilities are renormalized
        after adding the beta-binomial diagonal prior (``beta_binomial_prior``, scaling
        ``prior``), as the forward-sum loss and MAS see them in training."""
        k = F.normalize(self.key(text.transpose(1, 2)), dim=1)  # (B, A, N)
        q = F.normalize(self.query(mels.transpose(1, 2)), dim=1)  # (B, A, T)
        # |q - k|^2 = 2 - 2 q.k for unit vectors: one batched product
        scores = 2 * self.sharpness * (torch.bmm(q.transpose(1, 2), k) - 1)  # (B, T, N)
        scores = scores.masked_fill(~text_mask[:, None, :], float("-inf"))
        log_probs = scores.log_softmax(dim=-1)
        if frame_lengths is None or not self.prior:
            return log_probs
        B, T, N = log_probs.shape
        prior = beta_binomial_prior(text_mask.sum(dim=1), frame_lengths, T, N, self.prior)
        return (log_probs + prior).log_softmax(dim=-1)


@dataclass
class TTSOutput:
    mels: torch.Tensor  # (B, T, n_mels) after the post-net
    frame_lengths: torch.Tensor  # (B,)
    durations: torch.Tensor  # (B, N) frames per token
    alignment: torch.Tensor | None = None  # (B, T, N) soft alignment (training, joint)


class TextToFrames(nn.Module):
    """What both TTS models share: token embedding with positions, the Transformer encoder
    (the text encoder's layers), the post-net, and the frame/step positions."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, n_mels: int, postnet_layers: int):
        super().__init__()
        self.cfg = cfg
        self.n_mels = n_mels
        self.positions = Positions(cfg.positions, cfg.d_model, cfg.max_positions)
        self.embed = Embedding(vocab_size, cfg.d_model, self.positions, cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.enc_layers))
        pre = cfg.norm == "pre"
        self.enc_norm = make_norm(cfg.norm_type, cfg.d_model) if pre else None
        self.dec_norm = make_norm(cfg.norm_type, cfg.d_model) if pre else None
        self.postnet = ConvStack(n_mels, 256, postnet_layers - 1, 5, cfg.dropout) \
            if postnet_layers > 1 else None
        self.postnet_out = nn.Linear(256, n_mels) if postnet_layers > 1 else None

    def _stack(self, layers, norm, x, mask):
        attn_mask = None if bool(mask.all()) else mask[:, None, None, :]
        for layer in layers:
            x = layer(x, attn_mask, mask)
        return norm(x, mask) if norm is not None else x

    def encode(self, tokens: torch.Tensor):
        memory, mask, _ = self.encode_with_input(tokens)
        return memory, mask

    def encode_with_input(self, tokens: torch.Tensor):
        """The encoder's output (B, N, d), the token mask (B, N) and the encoder's input (the
        token embeddings with positions, B, N, d)."""
        mask = tokens.ne(PAD)
        embedded = self.embed(tokens)
        return self._stack(self.encoder, self.enc_norm, embedded, mask), mask, embedded

    def _postnet(self, mels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.postnet is None:
            return mels
        return mels + self.postnet_out(self.postnet(mels, mask))

    def _frame_losses(self, before, after, mels, mask) -> tuple[torch.Tensor, dict]:
        """L1 of the frames before and after the post-net on the real frames ``mask``, and
        their sum for the total: without a post-net the two are the same frames, counted once
        (``postnet`` is still reported: it is the output's loss, which validation reads)."""
        parts = {"mel": F.l1_loss(before[mask], mels[mask]),
                 "postnet": F.l1_loss(after[mask], mels[mask])}
        total = parts["mel"] if self.postnet is None else parts["mel"] + parts["postnet"]
        return total, parts


class FastSpeech(TextToFrames):
    """Tokens -> mel frames in one pass. Dimensions: B batch, N tokens, T frames, M mel bins."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, n_mels: int = 80,
                 predictor_channels: int = 256, postnet_layers: int = 5):
        super().__init__(cfg, vocab_size, n_mels, postnet_layers)
        self.decoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.dec_layers))
        self.duration_predictor = ConvStack(cfg.d_model, predictor_channels, 2, 3, cfg.dropout)
        self.duration_out = nn.Linear(predictor_channels, 1)
        self.aligner = AlignmentModule(cfg.d_model, n_mels, prior=cfg.tts_align_prior)
        self.mel_out = nn.Linear(cfg.d_model, n_mels)

    def align(self, tokens: torch.Tensor, mels: torch.Tensor, mel_lengths: torch.Tensor):
        """(B, T, N) alignment log-probabilities of the frames ``mels`` to ``tokens``. The keys
        come from the token embeddings, not the encoder's output (as in FastPitch), so the
        decoder's losses, which train the encoder, do not move them."""
        text = self.embed.tokens(tokens) * self.embed.scale
        return self.aligner(text, tokens.ne(PAD), mels, mel_lengths)

    def predict_log_durations(self, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, N) predicted log(1 + frames) per token."""
        h = self.duration_predictor(memory.detach(), mask)
        return self.duration_out(h).squeeze(-1).masked_fill(~mask, 0.0)

    def decode(self, memory: torch.Tensor, durations: torch.Tensor, max_frames: int | None = None):
        frames, frame_lengths = length_regulate(memory, durations, max_frames)
        frame_mask = lengths_mask(frame_lengths, frames.size(1))
        x = frames + self.positions(frames.size(1))[None]
        x = self._stack(self.decoder, self.dec_norm, x, frame_mask)
        before = self.mel_out(x)
        after = self._postnet(before, frame_mask)
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
            log_align = self.align(tokens, mels, mel_lengths)
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
        frames_total, frame_parts = self._frame_losses(before, after, mels, frame_mask)
        parts |= frame_parts
        total = total + parts["duration"] + frames_total
        return total, {k: float(v.detach()) for k, v in parts.items()} | {"durations": durations}

    forward = loss  # so DistributedDataParallel sees the training pass

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


def guided_attention_loss(attention: torch.Tensor, text_lengths: torch.Tensor,
                          frame_lengths: torch.Tensor, sigma: float = 0.2) -> torch.Tensor:
    """Mean attention mass (B, T, N) far from the diagonal, weighted by
    1 - exp(-(n / N - t / T)^2 / (2 sigma^2)) (Tachibana et al. 2018): a prior that makes
    attention align monotonically on a small corpus."""
    B, T, N = attention.shape
    t = torch.arange(T, device=attention.device)[None, :, None] / frame_lengths[:, None, None]
    n = torch.arange(N, device=attention.device)[None, None, :] / text_lengths[:, None, None]
    weight = 1 - torch.exp(-(n - t).square() / (2 * sigma ** 2))
    real = lengths_mask(frame_lengths, T)[:, :, None] & lengths_mask(text_lengths, N)[:, None, :]
    return (attention * weight)[real].sum() / real.sum().clamp(min=1)


def durations_from_attention(attention: torch.Tensor, text_lengths: torch.Tensor,
                             frame_lengths: torch.Tensor) -> torch.Tensor:
    """(B, N) frames per token read off an autoregressive model's cross-attention (B, T, N)
    (the teacher way to durations): the most probable monotonic path through it (MAS), so every
    token gets at least one frame and the durations sum to the frame count."""
    log_attention = attention.clamp(min=1e-8).log()
    return hard_durations(monotonic_alignment_search(log_attention, text_lengths, frame_lengths))


class TeacherDurations:
    """``train.durations_from``: frames per token (B, N) for a batch, read off a frozen
    TransformerTTS's teacher-forced attention (``durations_from_attention``) with its pre-net's
    dropout off, so an utterance's durations are the same every epoch. Each utterance is read
    once and kept by its batch key (split, index); a batch without keys is read every time."""

    def __init__(self, teacher: "TransformerTTS"):
        self.teacher = teacher
        self.cache: dict[tuple[str, int], torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, batch) -> torch.Tensor:
        lengths = batch.tokens.ne(PAD).sum(dim=1)
        keys = batch.keys
        if keys is None or any(k not in self.cache for k in keys):
            _, parts = self.teacher.loss(batch.tokens, batch.mels, batch.mel_lengths,
                                         prenet_dropout=False)
            durations = durations_from_attention(parts["attention"], lengths, batch.mel_lengths)
            if keys is not None:
                for k, row, n in zip(keys, durations, lengths.tolist()):
                    self.cache[k] = row[:n].cpu()
            return durations
        durations = torch.zeros_like(batch.tokens)
        for b, k in enumerate(keys):
            durations[b, : len(self.cache[k])] = self.cache[k]
        return durations


class AutoregressiveTTS(TextToFrames):
    """What the autoregressive TTS models share: ``reduction`` frames per decoder step, fed
    the previous step's last frame through a pre-net (two ReLU layers with dropout, on in
    synthesis too), a stop-token head, the teacher-forced loss (``_loss_parts``) and synthesis
    step by step until every row stops. A subclass gives the decoder: ``start_synthesis``
    (tokens -> its per-input state and the token mask) and ``synthesis_step`` (one step from
    the previous frame and that state). S = T / reduction decoder steps."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, n_mels: int, reduction: int,
                 prenet_dim: int, prenet_dropout: float, postnet_layers: int,
                 stop_pos_weight: float):
        super().__init__(cfg, vocab_size, n_mels, postnet_layers)
        self.reduction = reduction
        self.stop_pos_weight = stop_pos_weight
        self.prenet = nn.ModuleList([nn.Linear(n_mels, prenet_dim),
                                     nn.Linear(prenet_dim, prenet_dim)])
        self.prenet_dropout = prenet_dropout

    def _prenet(self, frames: torch.Tensor, stochastic: bool = True) -> torch.Tensor:
        # dropout on in inference too (Tacotron 2): the variation keeps decoding from looping
        for linear in self.prenet:
            frames = dropout(F.relu(linear(frames)), self.prenet_dropout, training=stochastic)
        return frames

    def _teacher_inputs(self, mels: torch.Tensor) -> torch.Tensor:
        """(B, S, M): the input frame of every decoder step in teacher forcing, the recording's
        last frame of the step before (zeros at the start)."""
        B, T, M = mels.shape
        r = self.reduction
        S = -(-T // r)
        steps = F.pad(mels, (0, 0, 0, S * r - T)).view(B, S, r, M)
        return torch.cat([mels.new_zeros(B, 1, M), steps[:, :-1, -1]], dim=1)

    def _loss_parts(self, before: torch.Tensor, stop_logits: torch.Tensor,
                    attention: torch.Tensor, mels: torch.Tensor, mel_lengths: torch.Tensor,
                    mask: torch.Tensor, guided_weight: float, guided_sigma: float
                    ) -> tuple[torch.Tensor, dict]:
        """The teacher-forced loss from the decoder's outputs over all S steps: frames before
        the post-net (B, S * r, M), stop logits (B, S * r), attention per step (B, S, N). L1 on
        the frames before and after the post-net, binary cross-entropy on the stop flags (1 at
        each row's last frame, weighted ``stop_pos_weight``: one frame in hundreds), guided
        attention. Returns the total and its parts with the attention per frame (B, T, N) and
        the frames before the post-net (B, T, M)."""
        T = mels.size(1)
        before, stop_logits = before[:, :T], stop_logits[:, :T]
        frame_mask = lengths_mask(mel_lengths, T)
        after = self._postnet(before, frame_mask)
        stop_target = (torch.arange(T, device=mels.device)[None, :] >= (mel_lengths - 1)[:, None])
        m = frame_mask[..., None].expand_as(mels)
        frames_total, parts = self._frame_losses(before, after, mels, m)
        parts["stop"] = F.binary_cross_entropy_with_logits(
            stop_logits[frame_mask], stop_target[frame_mask].float(),
            pos_weight=stop_logits.new_tensor(self.stop_pos_weight))
        attention_frames = attention.repeat_interleave(self.reduction, dim=1)[:, :T]
        parts["guided"] = guided_attention_loss(attention_frames, mask.sum(dim=1), mel_lengths,
                                                guided_sigma)
        total = frames_total + parts["stop"] + guided_weight * parts["guided"]
        return total, {k: float(v.detach()) for k, v in parts.items()} | {
            "attention": attention_frames.detach(), "before": before.detach()}

    def start_synthesis(self, tokens: torch.Tensor):
        """(the decoder's state for these inputs, the token mask (B, N))."""
        raise NotImplementedError

    def synthesis_step(self, prev: torch.Tensor, state, step: int):
        """One decoder step from the previous frame (B, M): its ``reduction`` frames (B, r, M)
        before the post-net, stop logits (B, r) and attention (B, N); updates ``state``."""
        raise NotImplementedError

    @torch.no_grad()
    def synthesize(self, tokens: torch.Tensor, max_frames: int = 1000,
                   stop_threshold: float = 0.5) -> TTSOutput:
        """Frames step by step until every row's stop probability passes ``stop_threshold``
        (or ``max_frames``). ``durations`` of the result are read off the attention
        (``durations_from_attention``)."""
        state, mask = self.start_synthesis(tokens)
        B, r, M = tokens.size(0), self.reduction, self.n_mels
        prev = self.mel_out.weight.new_zeros(B, M)  # every subclass has mel_out
        frames, attention = [], []
        frame_lengths = torch.full((B,), -1, dtype=torch.long, device=tokens.device)
        for step in range(-(-max_frames // r)):
            out, stop_logits, weights = self.synthesis_step(prev, state, step)
            frames.append(out)
            attention.append(weights)
            stop = torch.sigmoid(stop_logits) > stop_threshold  # (B, r)
            first = torch.where(stop.any(dim=1), stop.float().argmax(dim=1), r)
            ends = step * r + first + 1
            frame_lengths = torch.where((frame_lengths < 0) & (first < r), ends, frame_lengths)
            prev = out[:, -1]
            if bool((frame_lengths >= 0).all()):
                break
        mels = torch.cat(frames, dim=1)
        T = mels.size(1)
        frame_lengths = torch.where(frame_lengths < 0, torch.full_like(frame_lengths, T),
                                    frame_lengths).clamp(max=T)
        frame_mask = lengths_mask(frame_lengths, T)
        mels = self._postnet(mels.masked_fill(~frame_mask[..., None], 0.0), frame_mask)
        att = torch.stack(attention, dim=1).repeat_interleave(r, dim=1)[:, :T]
        durations = durations_from_attention(att, mask.sum(dim=1), frame_lengths)
        return TTSOutput(mels.masked_fill(~frame_mask[..., None], 0.0), frame_lengths,
                         durations, att)


class TransformerTTS(AutoregressiveTTS):
    """Autoregressive text-to-speech with a Transformer decoder: tokens -> mel frames,
    ``reduction`` frames per decoder step, with a stop-token head, a pre-net, a post-net and
    guided attention. The decoder layers and their key/value caches are the text decoder's.
    Dimensions as in FastSpeech; S = T / reduction decoder steps.

    ``cfg.tts_attention_keys`` = "embedding": the last decoder layer's cross-attention (the
    one guided attention trains and durations are read from) projects its keys from the
    encoder's input, the token embeddings with positions, instead of its output; its values
    stay the encoder's output. With the encoder's context in the keys, that attention
    follows words rather than phones (README, "Speech synthesis")."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, n_mels: int = 80, reduction: int = 2,
                 prenet_dropout: float = 0.5, postnet_layers: int = 5,
                 stop_pos_weight: float = 5.0):
        width = cfg.tts_prenet_dim or cfg.d_model
        super().__init__(cfg, vocab_size, n_mels, reduction, width, prenet_dropout,
                         postnet_layers, stop_pos_weight)
        self.embedding_keys = cfg.tts_attention_keys == "embedding"
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        # a bottleneck pre-net is projected up to the decoder's width (no ReLU, no dropout)
        self.prenet_up = nn.Linear(width, cfg.d_model) if width != cfg.d_model else None
        self.mel_out = nn.Linear(cfg.d_model, n_mels * reduction)
        self.stop_out = nn.Linear(cfg.d_model, reduction)

    def _prenet(self, frames: torch.Tensor, stochastic: bool = True) -> torch.Tensor:
        frames = super()._prenet(frames, stochastic)
        return frames if self.prenet_up is None else self.prenet_up(frames)

    def loss(self, tokens: torch.Tensor, mels: torch.Tensor, mel_lengths: torch.Tensor,
             guided_weight: float = 1.0, guided_sigma: float = 0.2,
             prenet_dropout: bool = True, sampling: float = 0.0, passes: int = 1
             ) -> tuple[torch.Tensor, dict]:
        """Teacher-forced loss (``_loss_parts``), guided attention on the last layer's
        cross-attention. ``prenet_dropout=False`` (with the model in eval mode): the same
        attention on every call, as durations are read from it.

        ``sampling`` > 0: scheduled sampling over frames, in two passes. A first,
        teacher-forced pass without gradients predicts every step's frames; in the second,
        each decoder step's input (B, S) is, with probability ``sampling``, that pass's
        prediction of the previous step's last frame instead of the recording's. Synthesis
        feeds the model its own frames, which a model trained on recorded frames alone
        handles badly (README, "Speech synthesis"). ``passes`` > 1: that many predicting
        passes, each fed the recording's frames mixed (with the same draw of steps) with the
        previous pass's predictions, so a sampled input can hold up to ``passes`` steps of
        the model's compounded errors instead of one."""
        memory, mask, embedded = self.encode_with_input(tokens)
        B, T, M = mels.shape
        r = self.reduction
        prev = self._teacher_inputs(mels)  # (B, S, M)
        S = prev.size(1)
        step_mask = lengths_mask(-(-mel_lengths // r), S)
        cross_mask = mask[:, None, None, :]
        if sampling > 0:
            use = torch.rand(B, S, 1, device=mels.device) < sampling
            use[:, 0] = False  # the first step's input is the zero frame either way
            recorded = prev
            for _ in range(passes):
                with torch.no_grad():
                    hidden, _ = self._decoder_pass(prev, memory, embedded, cross_mask,
                                                   step_mask, prenet_dropout)
                    predicted = self.mel_out(hidden).view(B, S, r, M)
                own = torch.cat([recorded[:, :1], predicted[:, :-1, -1]], dim=1)
                prev = torch.where(use, own, recorded)
        x, weights = self._decoder_pass(prev, memory, embedded, cross_mask, step_mask,
                                        prenet_dropout)
        return self._loss_parts(self.mel_out(x).view(B, S * r, M), self.stop_out(x).view(B, S * r),
                                weights.mean(dim=1), mels, mel_lengths, mask, guided_weight,
                                guided_sigma)

    forward = loss  # so DistributedDataParallel sees the training pass

    def _decoder_pass(self, prev: torch.Tensor, memory: torch.Tensor,
                      embedded: torch.Tensor | None, cross_mask: torch.Tensor,
                      step_mask: torch.Tensor, prenet_dropout: bool):
        """All decoder steps at once from their input frames ``prev`` (B, S, M): the last
        hidden states (B, S, d) and the last layer's cross-attention (B, nh, S, N)."""
        S = prev.size(1)
        x = self._prenet(prev, stochastic=prenet_dropout) + self.positions(S)[None]
        weights = None
        for i, layer in enumerate(self.decoder):
            x, weights = layer(x, memory, cross_mask, pad_mask=step_mask,
                               need_attention=i == len(self.decoder) - 1,
                               memory_keys=self._cross_keys(i, embedded))
        if self.dec_norm is not None:
            x = self.dec_norm(x, step_mask)
        return x, weights

    def init_caches(self, memory: torch.Tensor, embedded: torch.Tensor | None = None
                    ) -> list[LayerCache]:
        """Per decoder layer: an empty self-attention cache and the projected memory.
        ``embedded``: the encoder's input (``encode_with_input``), which the last layer's keys
        come from with ``tts_attention_keys`` = "embedding"."""
        if self.embedding_keys and embedded is None:
            raise ValueError("this model's last cross-attention takes its keys from the token "
                             "embeddings: pass embedded= (from encode_with_input)")
        caches = []
        for i, layer in enumerate(self.decoder):
            k, v = layer.cross_attn.project_memory(memory, self._cross_keys(i, embedded))
            caches.append(LayerCache(cross=KVCache(k, v)))
        return caches

    def _cross_keys(self, layer: int, embedded: torch.Tensor | None) -> torch.Tensor | None:
        """What decoder layer ``layer`` projects its cross-attention keys from when not the
        memory: the embeddings, for the last (guided) layer with embedding keys."""
        last = layer == len(self.decoder) - 1
        return embedded if last and self.embedding_keys else None

    def decode_step(self, prev: torch.Tensor, caches: list[LayerCache], cross_mask: torch.Tensor,
                    step: int):
        """One decoder step from the previous frame (B, M): its ``reduction`` frames
        (B, r, M) before the post-net, stop logits (B, r) and attention (B, N)."""
        B = prev.size(0)
        x = self._prenet(prev)[:, None] + self.positions(1, offset=step)[None]
        weights = None
        for i, layer in enumerate(self.decoder):
            x, weights = layer.step(x, caches[i], cross_mask,
                                    need_attention=i == len(self.decoder) - 1)
        if self.dec_norm is not None:
            x = self.dec_norm(x)
        out = self.mel_out(x[:, 0]).view(B, self.reduction, self.n_mels)
        return out, self.stop_out(x[:, 0]), weights.mean(dim=1)[:, 0]

    def start_synthesis(self, tokens: torch.Tensor):
        memory, mask, embedded = self.encode_with_input(tokens)
        return (self.init_caches(memory, embedded), mask[:, None, None, :]), mask

    def synthesis_step(self, prev: torch.Tensor, state, step: int):
        caches, cross_mask = state
        return self.decode_step(prev, caches, cross_mask, step)
