"""Label-smoothed cross-entropy over the non-pad target positions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from encdec.data.vocab import PAD


def label_smoothed_nll(logits: torch.Tensor, target: torch.Tensor, smoothing: float):
    """Summed loss and summed NLL over ``target`` (N,) given ``logits`` (N, V).

    The smoothed loss spreads ``smoothing`` uniformly over the vocabulary (Szegedy et al.);
    the plain NLL is returned as well because it is what perplexity is made of.
    """
    logits = logits.float()
    loss = F.cross_entropy(logits, target, label_smoothing=smoothing, reduction="sum",
                           ignore_index=PAD)
    if smoothing == 0.0:
        return loss, loss.detach()
    with torch.no_grad():
        nll = F.cross_entropy(logits, target, reduction="sum", ignore_index=PAD)
    return loss, nll


def sequence_loss(model, batch, smoothing: float):
    """(loss_sum, nll_sum) over the target tokens of ``batch`` (EOS included)."""
    hidden = model(batch.src_tokens, batch.tgt_in)  # (B, T, d)
    keep = batch.tgt_out.ne(PAD)
    # Project only real positions: with large vocabularies the output layer dominates.
    logits = model.module.logits(hidden[keep]) if hasattr(model, "module") else model.logits(hidden[keep])
    return label_smoothed_nll(logits, batch.tgt_out[keep], smoothing)
