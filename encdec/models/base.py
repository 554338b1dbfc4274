"""The contract between models and search.

Search (``encdec.decoding``) only ever calls these four methods, so any model family that
implements them (Transformer, recurrent, speech) gets greedy, beam and sampling for free:

* ``encode(**source) -> EncoderOut``: ``source`` is what the model's front reads, named for
  what it is: ``{"src_tokens": (B, S)}`` for text, ``{"src_feats": (B, T, F), "src_lengths":
  (B,)}`` for speech. Search passes it through without looking inside (``encode_source``).
* ``init_state(encoder_out, group_size) -> DecoderState``: state for ``B * group_size`` rows,
  rows ``g*group_size .. (g+1)*group_size-1`` all decoding input ``g`` (beam search uses
  ``group_size = beam_size``; greedy and sampling use 1).
* ``decode_step(prev_tokens (N,), state, need_attention=False) -> (log_probs (N, V), attention)``
  consumes one token per row and advances the state in place; ``attention`` is the last
  layer's cross-attention averaged over heads, (N, S), or None.
* ``reorder_state(state, index, group_size=None) -> state``: keep/reorder rows (``index`` is
  (N',) row ids), optionally changing the rows per input (beam search starts with one row per
  input and widens to ``beam_size`` after the first step). Rows of one group must come from a
  single input (beam reordering within an input, or dropping whole finished inputs), which
  lets the model share per-input tensors such as the projected encoder output.

Dimensions: B inputs, S encoder positions, T target tokens (or feature frames at the input),
F feature bins, K beam size, N = B * K decoder rows, V target vocabulary, d model width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EncoderOut:
    memory: torch.Tensor  # (B, S, d) encoder output
    memory_mask: torch.Tensor  # (B, S) bool, True at real (non-pad) source positions
    ctc_log_probs: torch.Tensor | None = None  # (B, S, V) from a CTC head, when the model has one


@dataclass
class DecoderState:
    group_size: int  # rows per input
    memory_mask: torch.Tensor  # (B_groups, S) bool
    step: int = 0  # tokens consumed so far (the next position)
    # model-specific caches: a LayerCache per Transformer decoder layer, one RecurrentCache
    layers: list = field(default_factory=list)

    def reorder(self, index: torch.Tensor, group_size: int | None = None) -> DecoderState:
        """``reorder_state`` for caches with ``reorder(rows, groups)``: keep/reorder the rows
        ``index`` (N',), ``group_size`` rows per input from now on (default: unchanged)."""
        new_group = group_size or self.group_size
        # The input of each new group is the input of its first row (rows never mix inputs).
        groups = index.view(-1, new_group)[:, 0] // self.group_size
        same_groups = groups.numel() == self.memory_mask.size(0) and bool(
            (groups == torch.arange(groups.numel(), device=groups.device)).all())
        for cache in self.layers:
            cache.reorder(index, None if same_groups else groups)
        if not same_groups:
            self.memory_mask = self.memory_mask.index_select(0, groups)
        self.group_size = new_group
        return self


def encode_source(model, source) -> EncoderOut:
    """``model.encode`` on a batch of inputs: a (B, S) token tensor, or a dict of named inputs."""
    return model.encode(**source) if isinstance(source, dict) else model.encode(source)


def source_to(source, device):
    """The same inputs on ``device``."""
    if isinstance(source, dict):
        return {k: v.to(device) for k, v in source.items()}
    return source.to(device)
