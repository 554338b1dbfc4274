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
            self.src_offsets = np.load(d / f"{split}.src.offsets.npy", mmap_mode="r")
            self.tgt_tokens = np.load(d / f"{split}.tgt.tokens.npy", mmap_mode="r")
            self.tgt_offsets = np.load(d / f"{split}.tgt.offsets.npy", mmap_mode="r")
        except FileNotFoundError as err:
            raise DataError(f"{data_dir}: split {split!r} is missing ({Path(err.filename).name})") from None
        # lengths in memory (4 bytes a pair and side), for batching; ids and offsets stay on disk
        self.src_lens = np.diff(self.src_offsets).astype(np.int32)
        self.tgt_lens = np.diff(self.tgt_offsets).astype(np.int32)

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
    # By target length, then source length, then the random noise: stable sorts from the least
    # significant key (np.lexsort's order; lengths sort as 16-bit ints, by radix, when they fit)
    order = idx[np.argsort(noise, kind="stable")]
    for lens in (src_lens, tgt_lens):
        key = lens[order]
        if len(key) and key.max() < 2 ** 16 and key.min() >= 0:
            key = key.astype(np.uint16)
        order = order[np.argsort(key, kind="stable")]
    width = np.maximum(src_lens[order], tgt_lens[order] + 1)  # +1: BOS/EOS on the target side
    batches, start, window = [], 0, 64
    while start < len(order):
        # the longest run from `start` whose size x widest stays within max_tokens (at least one
        # pair): the cost grows with the run, so it is a search in its running maximum
        while True:
            end = min(start + window, len(order))
            cost = np.maximum.accumulate(width[start:end]) * np.arange(1, end - start + 1)
            take = max(1, int(np.searchsorted(cost, max_tokens, side="right")))
            if take < end - start or end == len(order):
                break
            window *= 2
        batches.append(order[start:start + take])
        start += take
        window = max(64, 2 * take)
    if shuffle:
        perm = rng.permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches


def even_out(batches: list, world_size: int) -> list:
    """The epoch's batches, their number made a multiple of ``world_size`` by halving batches
    at its end (a half of a batch is within the token budget too), so that every process takes
    as many batches as the others and no pair is dropped or repeated. The batches before the
    last round stay as they are. Only when the tail is made of single pairs that cannot be
    halved enough is the remainder (fewer than ``world_size`` batches) left out."""
    if world_size <= 1 or len(batches) % world_size == 0:
        return batches
    region = len(batches) % world_size
    while True:
        tail = list(batches[len(batches) - region:])
        need = -len(tail) % world_size
        while need and max(len(b) for b in tail) > 1:
            i = max(range(len(tail)), key=lambda j: len(tail[j]))  # the first of the largest
            half = (len(tail[i]) + 1) // 2
            tail[i:i + 1] = [tail[i][:half], tail[i][half:]]
            need -= 1
        if not need:
            return list(batches[:len(batches) - region]) + tail
        if region == len(batches):
            return list(batches[:len(batches) - len(batches) % world_size])
        region += world_size


def shard(batches: list, rank: int, world_size: int) -> list:
    """This rank's batches of an epoch evened out by ``even_out``: every rank gets the same
    number (DDP steps stay in lock-step) and together they hold every batch once."""
    if world_size == 1:
        return batches
    return even_out(batches, world_size)[rank::world_size]


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
