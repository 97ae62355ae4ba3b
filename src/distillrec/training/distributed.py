"""The few DDP pieces the trainer needs: set-up under torchrun (gloo on CPU, NCCL on GPU), sharding, gathering."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist


def init_distributed() -> tuple[int, int]:
    """(rank, world_size); starts the process group when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(order: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank's share of ``order``, all shares the same length (DDP needs the same number of steps everywhere)."""
    if world == 1:
        return order
    per = len(order) // world
    return order[rank::world][:per]


def gather_rows(values: np.ndarray, n_total: int, rank: int, world: int) -> np.ndarray:
    """Inverse of ``rows[rank::world]`` striding: every rank gets all ``n_total`` values in row order."""
    if world == 1:
        return values
    per = (n_total + world - 1) // world
    padded = torch.full((per,), -1, dtype=torch.int64)
    padded[: len(values)] = torch.as_tensor(values, dtype=torch.int64)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = np.empty(n_total, dtype=np.int64)
    for r, part in enumerate(parts):
        n_r = len(range(r, n_total, world))
        out[r::world] = part[:n_r].numpy()
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_flag(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, 0)
    return bool(t.item())
