"""Autoregressive text-to-speech with a Tacotron-2 decoder: two LSTM cells and
location-sensitive attention over the text encoder's output.

Per decoder step (``reduction`` frames each), as in Tacotron 2 (Shen et al. 2018):

1. the previous step's last frame goes through the pre-net (dropout on in synthesis too);
2. the attention LSTM reads it with the last attention context;
3. location-sensitive attention (Chorowski et al. 2015) scores every token from the attention
   LSTM's state, the token's key and convolved features of the previous and the cumulative
   attention weights, so attention moves on from where it was rather than searching the text
   again at every step;
4. the decoder LSTM reads the attention LSTM's state with the new context;
5. the frames and stop logits are projected from the decoder LSTM's state *and the context*:
   the attended text reaches the frames directly, not only through the recurrence that also
   carries the previous frames (the Transformer decoder of ``TransformerTTS`` mixes both in one
   residual stream, and on bible-tts learned to continue its own frames rather than the text;
   README, "Speech synthesis").

The encoder, post-net, stop head, loss and synthesis loop are ``AutoregressiveTTS``'s. Training
runs the decoder step by step (the recurrence cannot be parallel over time), so scheduled
sampling is exact: with probability ``sampling`` a step reads the model's own previous frame.
Dimensions: B batch, N tokens, T frames, M mel bins, S = T / reduction steps, H the LSTMs'
width, A the attention's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from encdec.config import ModelConfig
from encdec.models.tts import AutoregressiveTTS
from encdec.nn.dropout import dropout


class LocationSensitiveAttention(nn.Module):
    """Additive attention with location features: energy_n = w . tanh(W q + k_n + U f_n),
    f = a convolution over the previous and the cumulative attention weights (B, 2, N)."""

    def __init__(self, d_query: int, d_memory: int, d_attention: int = 128,
                 filters: int = 32, kernel: int = 31):
        super().__init__()
        self.query = nn.Linear(d_query, d_attention, bias=False)
        self.key = nn.Linear(d_memory, d_attention, bias=False)
        self.location_conv = nn.Conv1d(2, filters, kernel, padding=kernel // 2, bias=False)
        self.location = nn.Linear(filters, d_attention, bias=False)
        self.energy = nn.Linear(d_attention, 1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor, previous: torch.Tensor, cumulative: torch.Tensor):
        """``query`` (B, H), ``keys`` (B, N, A) (``self.key`` of the memory, once per input),
        ``values`` (B, N, d), ``mask`` (B, N), ``previous``/``cumulative`` weights (B, N) ->
        the context (B, d) and the new weights (B, N)."""
        location = self.location_conv(torch.stack([previous, cumulative], dim=1))  # (B, F, N)
        hidden = self.query(query)[:, None] + keys + self.location(location.transpose(1, 2))
        energies = self.energy(torch.tanh(hidden)).squeeze(-1)  # (B, N)
        weights = energies.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return torch.bmm(weights[:, None], values).squeeze(1), weights


@dataclass
class TacotronState:
    """The decoder's state for one batch of inputs; ``synthesis_step`` updates it in place.
    Rows are independent (no beams), so there is nothing to reorder."""
    attention_rnn: tuple[torch.Tensor, torch.Tensor]  # (h, c), (B, H) each
    decoder_rnn: tuple[torch.Tensor, torch.Tensor]  # (h, c), (B, H) each
    context: torch.Tensor  # (B, d): the last attention context
    weights: torch.Tensor  # (B, N): the last attention weights
    cumulative: torch.Tensor  # (B, N): their sum over the steps so far
    values: torch.Tensor  # (B, N, d): the encoder's output
    keys: torch.Tensor  # (B, N, A): its projection for the attention
    mask: torch.Tensor  # (B, N): real tokens


class Tacotron2(AutoregressiveTTS):
    """Tokens -> mel frames with the Tacotron-2 decoder of this module's docstring."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, n_mels: int = 80, reduction: int = 2,
                 prenet_dropout: float = 0.5, postnet_layers: int = 5,
                 stop_pos_weight: float = 5.0, attention_dim: int = 128,
                 location_filters: int = 32, location_kernel: int = 31):
        super().__init__(cfg, vocab_size, n_mels, reduction, cfg.tts_prenet_dim or 256,
                         prenet_dropout, postnet_layers, stop_pos_weight)
        d, H, P = cfg.d_model, cfg.tts_decoder_dim, cfg.tts_prenet_dim or 256
        self.dec_norm = None  # no Transformer decoder to normalize
        self.attention_rnn = nn.LSTMCell(P + d, H)
        self.attention = LocationSensitiveAttention(H, d, attention_dim, location_filters,
                                                    location_kernel)
        self.decoder_rnn = nn.LSTMCell(H + d, H)
        self.mel_out = nn.Linear(H + d, n_mels * reduction)
        self.stop_out = nn.Linear(H + d, reduction)

    def start_synthesis(self, tokens: torch.Tensor):
        memory, mask = self.encode(tokens)
        B, N, d = memory.shape
        H = self.attention_rnn.hidden_size
        zeros = memory.new_zeros(B, H)
        weights = memory.new_zeros(B, N)
        state = TacotronState((zeros, zeros), (zeros, zeros), memory.new_zeros(B, d), weights,
                              weights, memory, self.attention.key(memory), mask)
        return state, mask

    def _step(self, x: torch.Tensor, state: TacotronState):
        """One step from the pre-net's output ``x`` (B, P): frames (B, r, M), stop logits
        (B, r), attention weights (B, N). Dropout on the LSTMs' outputs in training, in place
        of Tacotron 2's zoneout."""
        h, c = self.attention_rnn(torch.cat([x, state.context], dim=-1), state.attention_rnn)
        h = dropout(h, self.cfg.dropout, self.training)
        state.attention_rnn = (h, c)
        state.context, state.weights = self.attention(h, state.keys, state.values, state.mask,
                                                      state.weights, state.cumulative)
        state.cumulative = state.cumulative + state.weights
        h, c = self.decoder_rnn(torch.cat([h, state.context], dim=-1), state.decoder_rnn)
        h = dropout(h, self.cfg.dropout, self.training)
        state.decoder_rnn = (h, c)
        out = torch.cat([h, state.context], dim=-1)
        frames = self.mel_out(out).view(x.size(0), self.reduction, self.n_mels)
        return frames, self.stop_out(out), state.weights

    def synthesis_step(self, prev: torch.Tensor, state: TacotronState, step: int):
        return self._step(self._prenet(prev), state)

    def loss(self, tokens: torch.Tensor, mels: torch.Tensor, mel_lengths: torch.Tensor,
             guided_weight: float = 1.0, guided_sigma: float = 0.2,
             prenet_dropout: bool = True, sampling: float = 0.0, passes: int = 1
             ) -> tuple[torch.Tensor, dict]:
        """Teacher-forced loss (``AutoregressiveTTS._loss_parts``), step by step.
        ``sampling`` > 0: each step after the first reads, with that probability, the
        model's own last frame of the step before (without its gradient) instead of the
        recording's. ``prenet_dropout=False`` (with the model in eval mode): the same
        attention on every call, as durations are read from it. ``passes`` is
        ``TransformerTTS``'s (its sampling is parallel over steps); here it must be 1."""
        if passes != 1:
            raise ValueError(f"passes={passes}: Tacotron2 samples step by step, exactly as "
                             "synthesis does; several predicting passes are TransformerTTS's")
        state, mask = self.start_synthesis(tokens)
        recorded = self._teacher_inputs(mels)  # (B, S, M)
        B, S, M = recorded.shape
        x = self._prenet(recorded, stochastic=prenet_dropout)  # (B, S, P): all steps at once
        use = None
        if sampling > 0:
            use = torch.rand(B, S, 1, device=mels.device) < sampling
        frames, stops, weights = [], [], []
        for s in range(S):
            step_in = x[:, s]
            if use is not None and s > 0:
                own = self._prenet(frames[-1][:, -1].detach(), stochastic=prenet_dropout)
                step_in = torch.where(use[:, s], own, step_in)
            out, stop, w = self._step(step_in, state)
            frames.append(out)
            stops.append(stop)
            weights.append(w)
        before = torch.cat(frames, dim=1)  # (B, S * r, M)
        return self._loss_parts(before, torch.cat(stops, dim=1), torch.stack(weights, dim=1),
                                mels, mel_lengths, mask, guided_weight, guided_sigma)

    forward = loss  # so DistributedDataParallel sees the training pass
