"""Binarized splits (memory-mapped), token-based length-bucketed batches, and collation."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from encdec.data.corpus import DataError
from encdec.data.vocab import BOS, EOS, PAD


class BinarizedSplit:
    """Token ids of one split, memory-mapped: start-up costs nothing, RAM holds only what is read."""

    def __init__(self, data_dir: str | Path, split: str):
        d = Path(data_dir)
        try:
            self.src_tokens = np.load(d / f"{split}.src.tokens.npy", mmap_mode="r")
            self.src_offsets = np.load(d / f"{split}.src.offsets.npy")
            self.tgt_tokens = np.load(d / f"{split}.tgt.tokens.npy", mmap_mode="r")
            self.tgt_offsets = np.load(d / f"{split}.tgt.offsets.npy")
        except FileNotFoundError as err:
            raise DataError(f"{data_dir}: split {split!r} is missing ({Path(err.filename).name})") from None
        self.src_lens = np.diff(self.src_offsets)
        self.tgt_lens = np.diff(self.tgt_offsets)

    def __len__(self) -> int:
        return len(self.src_lens)

    def src(self, i: int) -> np.ndarray:
        return self.src_tokens[self.src_offsets[i]:self.src_offsets[i + 1]]

    def tgt(self, i: int) -> np.ndarray:
        return self.tgt_tokens[self.tgt_offsets[i]:self.tgt_offsets[i + 1]]


def read_eval(data_dir: str | Path, split: str) -> list[dict]:
    path = Path(data_dir) / f"{split}.eval.jsonl"
    if not path.exists():
        raise DataError(f"{data_dir}: split {split!r} has no evaluation file ({path.name})")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def token_batches(src_lens: np.ndarray, tgt_lens: np.ndarray, max_tokens: int, *, seed: int,
                  epoch: int, shuffle: bool = True, max_len: int = 0) -> list[np.ndarray]:
    """Batches of indices holding at most ``max_tokens`` padded tokens each.

    Pairs are sorted by length (random order among equal lengths) so a batch carries little
    padding; the batch order is then shuffled. Everything depends only on (seed, epoch), which
    is what makes resuming mid-epoch exact.
    """
    rng = np.random.default_rng([seed, epoch])
    n = len(src_lens)
    idx = np.arange(n)
    if max_len:
        idx = idx[(src_lens <= max_len) & (tgt_lens <= max_len)]
    noise = rng.random(len(idx)) if shuffle else np.arange(len(idx))
    order = idx[np.lexsort((noise, src_lens[idx], tgt_lens[idx]))]
    width = np.maximum(src_lens[order], tgt_lens[order] + 1)  # +1: BOS/EOS on the target side
    batches, start = [], 0
    widest = 0
    for pos in range(len(order)):
        w = int(width[pos])
        if pos > start and max(widest, w) * (pos - start + 1) > max_tokens:
            batches.append(order[start:pos])
            start, widest = pos, 0
        widest = max(widest, w)
    if start < len(order):
        batches.append(order[start:])
    if shuffle:
        perm = rng.permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def shard(batches: list, rank: int, world_size: int) -> list:
    """This rank's batches; every rank gets the same number so DDP steps stay in lock-step."""
    if world_size == 1:
        return batches
    per_rank = len(batches) // world_size
    return batches[rank: per_rank * world_size: world_size]


@dataclass
class Batch:
    src_tokens: torch.Tensor  # (B, S) source ids, PAD-padded
    tgt_in: torch.Tensor  # (B, T) BOS + target
    tgt_out: torch.Tensor  # (B, T) target + EOS, PAD-padded
    num_tgt_tokens: int  # non-pad target tokens (including EOS)

    def to(self, device) -> "Batch":
        return Batch(self.src_tokens.to(device, non_blocking=True),
                     self.tgt_in.to(device, non_blocking=True),
                     self.tgt_out.to(device, non_blocking=True), self.num_tgt_tokens)


def pad(seqs) -> torch.Tensor:
    """Token id sequences as one (len(seqs), longest) tensor, PAD after each."""
    out = np.full((len(seqs), max(len(s) for s in seqs)), PAD, dtype=np.int64)
    for b, s in enumerate(seqs):
        out[b, : len(s)] = s
    return torch.from_numpy(out)


def teacher_forcing(tgts) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs (BOS + target) and outputs (target + EOS), each (len(tgts), longest + 1)."""
    T = max(len(t) for t in tgts) + 1
    tgt_in = np.full((len(tgts), T), PAD, dtype=np.int64)
    tgt_out = np.full((len(tgts), T), PAD, dtype=np.int64)
    tgt_in[:, 0] = BOS
    for b, t in enumerate(tgts):
        tgt_in[b, 1: len(t) + 1] = t
        tgt_out[b, : len(t)] = t
        tgt_out[b, len(t)] = EOS
    return torch.from_numpy(tgt_in), torch.from_numpy(tgt_out)


def collate(split: BinarizedSplit, indices: np.ndarray) -> Batch:
    srcs = [split.src(i) for i in indices]
    tgts = [split.tgt(i) for i in indices]
    ntok = int(sum(len(t) for t in tgts)) + len(indices)
    return Batch(pad(srcs), *teacher_forcing(tgts), ntok)
