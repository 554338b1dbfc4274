"""Monotonic alignment of input tokens to output frames, learned without an external aligner,
and the length regulator that expands tokens by their durations (non-autoregressive TTS).

A monotonic path assigns every frame t of an utterance (T frames) one token j(t) of its N
tokens: j(0) = 0, j(T - 1) = N - 1, and j(t) - j(t - 1) is 0 or 1, so every token gets at least
one frame (T >= N is needed). Given per-frame token log-probabilities ``log_probs`` (B, T, N),
e.g. a log-softmax over tokens of an alignment module's scores:

* ``forward_sum_loss``: -log of the probability summed over all monotonic paths, the
  forward algorithm (CTC's), per frame; its gradient trains the alignment module ("One TTS
  Alignment To Rule Them All", Badlani et al. 2022). By default a frame may also be passed over
  (CTC's blank, at a fixed score), as in that paper's code;
* ``monotonic_alignment_search`` (MAS, as in Glow-TTS): the single most probable path, by
  dynamic programming and backtracking, as a hard 0/1 alignment (B, T, N);
* ``binarization_loss``: pulls the soft alignment toward the hard one;
* ``durations``: frames per token of a hard alignment (the targets of a duration predictor);
* ``length_regulate``: every token's vector repeated for its number of frames.

Rows are padded: ``text_lengths`` (B,) and ``frame_lengths`` (B,) say how much is real. The
forward algorithm is PyTorch's CTC kernel (forward and gradient in C++: a Python loop over
frames with autograd took 4x as long on a CPU); MAS loops over frames in NumPy on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def _masked(log_probs: torch.Tensor, text_lengths: torch.Tensor) -> torch.Tensor:
    B, T, N = log_probs.shape
    real = torch.arange(N, device=log_probs.device)[None, :] < text_lengths[:, None]
    return log_probs.masked_fill(~real[:, None, :], NEG_INF)


# The forward algorithm runs on log-probabilities clamped to this (not -inf): the gradient of
# logaddexp(-inf, -inf) is NaN, and unreachable cells would spread it to every parameter.
NEVER = -1e9
BLANK = -1.0  # forward_sum_loss's blank score (as in RAD-TTS)


def forward_sum_loss(log_probs: torch.Tensor, text_lengths: torch.Tensor,
                     frame_lengths: torch.Tensor, blank: float | None = BLANK) -> torch.Tensor:
    """Mean over the batch of -log sum over paths of prod_t p(j(t) | t), divided by each row's
    frame count. A row with fewer frames than tokens has no path: it contributes 0 (and no
    gradient), like CTC's ``zero_infinity``.

    ``blank`` (a log-score, default -1): a path may also pass over frames, CTC's blank, whose
    score joins each frame's token log-probabilities before they are renormalized over both.
    Without it (``None``: monotonic paths over the tokens only) every frame, the pauses and
    transitions too, must belong to a token; on bible-tts that drove a few tokens to match
    every frame and the hard alignment collapsed onto them (a few tokens with 50+ frames, the
    rest one each). MAS, the durations and the binarization loss see only the tokens.

    It is PyTorch's CTC over the targets 1..N (class 0: the blank, never taken when ``blank``
    is None). CTC's gradient is the one through a log-softmax over the classes, so the classes
    are renormalized first and, without a blank, the normalizers added back: exact for any
    scores."""
    B, T, N = log_probs.shape
    lp = _masked(log_probs, text_lengths).clamp(min=NEVER)
    log_z = lp.logsumexp(dim=-1, keepdim=True)  # (B, T, 1)
    if blank is None:
        classes = torch.cat([lp.new_full((B, T, 1), NEVER), lp - log_z], dim=-1)
    else:
        classes = torch.cat([lp.new_full((B, T, 1), blank), lp], dim=-1).log_softmax(dim=-1)
    targets = torch.arange(1, N + 1, device=lp.device).expand(B, N)
    ok = (frame_lengths >= text_lengths) & (text_lengths > 0)
    nll = F.ctc_loss(classes.transpose(0, 1), targets, frame_lengths.clamp(min=1),
                     text_lengths.clamp(min=1), blank=0, reduction="none", zero_infinity=True)
    if blank is None:
        real = torch.arange(T, device=lp.device)[None, :] < frame_lengths[:, None]
        nll = nll - (log_z.squeeze(-1) * real).sum(dim=1)
    nll = torch.where(ok, nll, torch.zeros_like(nll)) / frame_lengths.clamp(min=1)
    return nll.mean()


@torch.no_grad()
def monotonic_alignment_search(log_probs: torch.Tensor, text_lengths: torch.Tensor,
                               frame_lengths: torch.Tensor) -> torch.Tensor:
    """(B, T, N) 0/1: the most probable monotonic path of each row (all zeros past its real
    frames and tokens; all zeros for a row with fewer frames than tokens)."""
    B, T, N = log_probs.shape
    lp = _masked(log_probs.float(), text_lengths).cpu().numpy()
    score = np.empty((B, T, N), dtype=np.float32)
    score[:, 0] = lp[:, 0]
    score[:, 0, 1:] = NEG_INF
    for t in range(1, T):  # best path score ending on token j at frame t
        prev = score[:, t - 1]
        score[:, t, 0] = prev[:, 0] + lp[:, t, 0]
        np.add(np.maximum(prev[:, 1:], prev[:, :-1]), lp[:, t, 1:], out=score[:, t, 1:])
    path = np.zeros((B, T, N), dtype=np.float32)
    for b, (n, f) in enumerate(zip(text_lengths.tolist(), frame_lengths.tolist())):
        if not (f >= n > 0):
            continue
        row, j = score[b], n - 1
        for t in range(min(f, T) - 1, 0, -1):
            path[b, t, j] = 1.0
            # step back to token j - 1 when it scored higher at t - 1 (ties stay on token j)
            if j > 0 and row[t - 1, j - 1] > row[t - 1, j]:
                j -= 1
        path[b, 0, j] = 1.0
    return torch.from_numpy(path).to(log_probs.device)


def beta_binomial_prior(text_lengths: torch.Tensor, frame_lengths: torch.Tensor, T: int, N: int,
                        scaling: float = 1.0) -> torch.Tensor:
    """(B, T, N) log-probabilities of a near-diagonal alignment prior: at frame t of a row with
    T' frames and N' tokens, token k ~ BetaBinomial(n = N' - 1, a = w (t + 1), b = w (T' - t)),
    w = ``scaling`` (Badlani et al. 2022, as in RAD-TTS). Added to the alignment module's
    log-probabilities it keeps early training from collapsing every frame onto one token;
    padded tokens are -inf, padded frames 0."""
    dev = text_lengths.device
    k = torch.arange(N, device=dev, dtype=torch.float64)[None, None, :]
    t = torch.arange(T, device=dev, dtype=torch.float64)[None, :, None]
    n = (text_lengths.double() - 1).clamp(min=0)[:, None, None]
    frames = frame_lengths.double()[:, None, None]
    a = scaling * (t + 1)
    b = (scaling * (frames - t)).clamp(min=1e-3)  # frames past the row's end: masked below
    lg = torch.lgamma
    log_p = (lg(n + 1) - lg(k + 1) - lg((n - k).clamp(min=0) + 1)
             + lg(k + a) + lg((n - k).clamp(min=0) + b) - lg(n + a + b)
             - lg(a) - lg(b) + lg(a + b))
    log_p = log_p.masked_fill(k > n, NEG_INF)
    return log_p.masked_fill(t >= frames, 0.0).float()


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
