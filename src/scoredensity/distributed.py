"""Small helpers around ``torch.distributed`` for the trainer (torchrun or ``torch.multiprocessing``; gloo on CPU).

The trainer uses a manual all-reduce (sum) of gradients rather than DDP: every process computes
``sum_i loss_i / global_batch`` over its shard of the global batch, gradients are summed over processes,
and every process then takes the same optimiser step. Because each example's noise is keyed by its global
index, the result equals a single process with the same global batch up to floating-point summation order.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["rank_world", "init_from_env", "all_reduce_sum_", "barrier", "is_main", "shard"]


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank_world()[0] == 0


def init_from_env(backend: str = "gloo") -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1, ``env://``).

    Returns:
        True when running distributed (already initialised or initialised here).
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend=backend)
        return True
    return False


def all_reduce_sum_(tensors: list[Tensor]) -> None:
    """Sum tensors over all processes in place (one flat buffer, one collective); no-op in one process."""
    _, world = rank_world()
    if world == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    off = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[off : off + n].reshape(t.shape).to(t.dtype))
        off += n


def barrier() -> None:
    """Synchronise all processes (no-op in one process)."""
    if rank_world()[1] > 1:
        dist.barrier()


def shard(n: int) -> Tensor:
    """Positions ``0..n-1`` of a global batch that this process handles (contiguous, near-equal shards)."""
    rank, world = rank_world()
    return torch.tensor_split(torch.arange(n), world)[rank]
