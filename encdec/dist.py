"""Process groups for torchrun (DDP): the only module that talks to torch.distributed."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device_kind: str) -> DistInfo:
    """Join the process group torchrun set up (gloo on CPU, NCCL on GPU); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _reduce_int(value: int, info: DistInfo, device, op) -> int:
    if info.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=op)
    return int(t.item())


def max_ints(values: list[int], info: DistInfo, device="cpu") -> list[int]:
    """The elementwise largest of ``values`` over all ranks, on every rank, in one collective
    (keeps stop decisions in lock-step)."""
    if info.world_size == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def sum_int(value: int, info: DistInfo, device="cpu") -> int:
    """The sum of ``value`` over all ranks (the same on every rank)."""
    return _reduce_int(value, info, device, dist.ReduceOp.SUM)


def broadcast(obj, info: DistInfo):
    if info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, info: DistInfo) -> list:
    if info.world_size == 1:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
