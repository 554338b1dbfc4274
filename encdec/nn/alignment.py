"""Monotonic alignment of input tokens to output frames, learned without an external aligner,
and the length regulator that expands tokens by their durations (non-autoregressive TTS).

A monotonic path assigns every frame t of an utterance (T frames) one token j(t) of its N
tokens: j(0) = 0, j(T - 1) = N - 1, and j(t) - j(t - 1) is 0 or 1, so every token gets at least
one frame (T >= N is needed). Given per-frame token log-probabilities ``log_probs`` (B, T, N),
e.g. a log-softmax over tokens of an alignment module's scores:

* ``forward_sum_loss``: -log of the probability summed over all monotonic paths, the
  forward algorithm (CTC's, without blanks), per frame; its gradient trains the alignment
  module ("One TTS Alignment To Rule Them All", Badlani et al. 2022);
* ``monotonic_alignment_search`` (MAS, as in Glow-TTS): the single most probable path, by
  dynamic programming and backtracking, as a hard 0/1 alignment (B, T, N);
* ``binarization_loss``: pulls the soft alignment toward the hard one;
* ``durations``: frames per token of a hard alignment (the targets of a duration predictor);
* ``length_regulate``: every token's vector repeated for its number of frames.

Rows are padded: ``text_lengths`` (B,) and ``frame_lengths`` (B,) say how much is real. The
dynamic programs loop over frames in Python and are vectorized over the batch and the tokens.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def _masked(log_probs: torch.Tensor, text_lengths: torch.Tensor) -> torch.Tensor:
    B, T, N = log_probs.shape
    real = torch.arange(N, device=log_probs.device)[None, :] < text_lengths[:, None]
    return log_probs.masked_fill(~real[:, None, :], NEG_INF)


def _shift_right(x: torch.Tensor, fill: float = NEG_INF) -> torch.Tensor:
    """x[:, j - 1] at column j, ``fill`` at column 0."""
    return torch.cat([x.new_full((x.size(0), 1), fill), x[:, :-1]], dim=1)


# The forward algorithm runs on log-probabilities clamped to this (not -inf): the gradient of
# logaddexp(-inf, -inf) is NaN, and unreachable cells would spread it to every parameter.
NEVER = -1e9


def forward_sum_loss(log_probs: torch.Tensor, text_lengths: torch.Tensor,
                     frame_lengths: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -log sum over monotonic paths of prod_t p(j(t) | t), divided by
    each row's frame count. A row with fewer frames than tokens has no path: it contributes 0
    (and no gradient), like CTC's ``zero_infinity``."""
    B, T, N = log_probs.shape
    lp = _masked(log_probs, text_lengths).clamp(min=NEVER)
    first = torch.arange(N, device=lp.device)[None, :] > 0
    alpha = lp[:, 0].masked_fill(first, NEVER)
    total = lp.new_zeros(B)
    last = (frame_lengths - 1).clamp(min=0)
    end_token = (text_lengths - 1).clamp(min=0)
    for t in range(T):
        if t:
            alpha = torch.logaddexp(alpha, _shift_right(alpha, NEVER)) + lp[:, t]
            alpha = alpha.clamp(min=NEVER)
        done = last == t
        if done.any():
            total = torch.where(done, alpha.gather(1, end_token[:, None]).squeeze(1), total)
    ok = (total > NEVER / 2) & (frame_lengths >= text_lengths) & (text_lengths > 0)
    nll = torch.where(ok, -total, torch.zeros_like(total)) / frame_lengths.clamp(min=1)
    return nll.mean()


@torch.no_grad()
def monotonic_alignment_search(log_probs: torch.Tensor, text_lengths: torch.Tensor,
                               frame_lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, N) 0/1: the most probable monotonic path of each row (all zeros past its real
    frames and tokens; all zeros for a row with fewer frames than tokens)."""
    B, T, N = log_probs.shape
    lp = _masked(log_probs.float(), text_lengths)
    score = torch.empty(B, T, N, device=lp.device)
    score[:, 0] = lp[:, 0].masked_fill(torch.arange(N, device=lp.device)[None, :] > 0, NEG_INF)
    for t in range(1, T):
        score[:, t] = torch.maximum(score[:, t - 1], _shift_right(score[:, t - 1])) + lp[:, t]
    path = torch.zeros(B, T, N, device=lp.device)
    rows = torch.arange(B, device=lp.device)
    j = (text_lengths - 1).clamp(min=0).clone()
    valid = (frame_lengths >= text_lengths) & (text_lengths > 0)
    for t in range(T - 1, -1, -1):
        inside = valid & (t < frame_lengths)
        path[rows, t, j] = inside.to(path.dtype)  # no boolean indexing (a sync per frame)
        if t == 0:
            break
        # step back to token j - 1 when it scored higher at t - 1 (ties stay on token j)
        here = score[rows, t - 1, j]
        before = torch.where(j > 0, score[rows, t - 1, (j - 1).clamp(min=0)],
                             torch.full_like(here, NEG_INF))
        j = torch.where(inside & (before > here), j - 1, j)
    return path


def binarization_loss(hard: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """-mean of the soft alignment's log-probabilities on the hard path's cells."""
    cells = hard.sum().clamp(min=1)
    picked = torch.where(hard > 0, log_probs, torch.zeros_like(log_probs))
    return -picked.sum() / cells


def durations(hard: torch.Tensor) -> torch.Tensor:
    """(B, T, N) hard alignment -> (B, N) frames per token (long)."""
    return hard.sum(dim=1).round().long()


def length_regulate(x: torch.Tensor, durations: torch.Tensor,
                    max_frames: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token vectors (B, N, D) repeated by their ``durations`` (B, N) -> frames (B, T, D), zero
    past each row's end, and the frame counts (B,). T = the longest row, or ``max_frames``."""
    d = durations.clamp(min=0).long()
    ends = d.cumsum(dim=1)  # (B, N): the first frame after each token
    frame_lengths = ends[:, -1] if d.size(1) else d.new_zeros(d.size(0))
    T = int(frame_lengths.max()) if max_frames is None and d.numel() else (max_frames or 0)
    frames = torch.arange(T, device=x.device)[None, :].expand(d.size(0), T).contiguous()
    token = torch.searchsorted(ends, frames, right=True).clamp(max=max(d.size(1) - 1, 0))
    out = x.gather(1, token[..., None].expand(-1, -1, x.size(-1)))
    real = frames < frame_lengths[:, None]
    return out.masked_fill(~real[..., None], 0.0), frame_lengths.clamp(max=T)
