"""Scheduled sampling (Bengio et al., 2015): how often, as training goes on, a decoder input is
the model's own prediction instead of the reference, and the decoder inputs that mix them."""

from __future__ import annotations

import math

import torch

from encdec.data.vocab import PAD


def sampling_prob(step: int, cfg) -> float:
    """Scheduled sampling: probability that a decoder input is the model's own prediction,
    by the schedule's own steps, counted from train.ss_start_step."""
    if cfg.scheduled_sampling == "off" or step < cfg.ss_start_step:
        return 0.0
    step -= cfg.ss_start_step
    if cfg.scheduled_sampling == "linear":
        eps = max(0.0, 1.0 - step / cfg.ss_steps)
    elif cfg.scheduled_sampling == "exponential":
        eps = cfg.ss_k ** step
    else:  # inverse sigmoid
        eps = cfg.ss_k / (cfg.ss_k + math.exp(min(step / cfg.ss_k, 700.0)))
    return min(cfg.ss_max_prob, 1.0 - eps)


def mix_predictions(tgt_in: torch.Tensor, predicted: torch.Tensor, prob: float) -> torch.Tensor:
    """Decoder inputs for a second pass: position t > 0 takes, with probability ``prob``, the
    first pass's prediction for it (made at t - 1) instead of the reference; padding stays."""
    shifted = torch.cat([tgt_in[:, :1], predicted[:, :-1]], dim=1)
    use = torch.rand(tgt_in.shape, device=tgt_in.device) < prob
    use[:, 0] = False  # BOS
    return torch.where(use & tgt_in.ne(PAD), shifted, tgt_in)
