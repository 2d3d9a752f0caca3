"""Devices and ``torch.distributed`` for the trainer (torchrun or ``torch.multiprocessing``).

The trainer uses a manual all-reduce (sum) of gradients rather than DDP: every process computes
``sum_i loss_i / global_batch`` over its shard of the global batch, gradients are summed over processes,
and every process then takes the same optimiser step. Because each example's noise is keyed by its global
index, the result equals a single process with the same global batch up to floating-point summation order.

The process-group backend follows the device: ``nccl`` for CUDA, ``gloo`` for the CPU (and MPS). Under torchrun
``"cuda"`` means this process's GPU, ``cuda:$LOCAL_RANK``.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "rank_world",
    "init_from_env",
    "all_reduce_sum_",
    "barrier",
    "is_main",
    "shard",
    "default_device",
    "resolve_device",
    "backend_for",
]


def default_device() -> str:
    """``"cuda"`` when a CUDA device is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Check that ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``; None: :func:`default_device`) exists
    here and return it. Under torchrun, plain ``"cuda"`` becomes ``cuda:$LOCAL_RANK``.

    Raises:
        ValueError: an unknown device name, or one that is not available on this machine (one line, naming it).
    """
    name = default_device() if device is None else str(device)
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} is not available (torch.cuda.is_available() is False); use --device cpu")
        count = torch.cuda.device_count()
        index = dev.index
        if index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            index = int(os.environ.get("LOCAL_RANK", "0"))
        if index is not None and not 0 <= index < count:
            raise ValueError(f"device {name!r} is not available: this machine has {count} CUDA device(s)")
        return torch.device("cuda", index if index is not None else torch.cuda.current_device())
    if dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device {name!r} is not available (torch.backends.mps.is_available() is False)")
        return dev
    raise ValueError(f"unsupported device {name!r}; use 'cpu', 'cuda', 'cuda:N' or 'mps'")


def join_process_group(device: torch.device) -> bool:
    """Under torchrun (``WORLD_SIZE`` > 1): join the process group with :func:`backend_for` ``device`` (nccl on
    CUDA, gloo otherwise), unless already joined. Returns True when running distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    return True


def local_device(device: torch.device) -> torch.device:
    """This process's device: plain ``cuda`` becomes ``cuda:$LOCAL_RANK`` under torchrun (and is made current)."""
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        if device.index is None or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def backend_for(device: str | torch.device | None) -> str:
    """The process-group backend for ``device``: ``"nccl"`` on CUDA, ``"gloo"`` otherwise."""
    name = default_device() if device is None else str(device)
    return "nccl" if name.startswith("cuda") else "gloo"


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank_world()[0] == 0


def init_from_env(backend: str | None = None, device: str | torch.device | None = None) -> bool:
    """Initialise the default process group from torchrun's environment (``WORLD_SIZE`` > 1, ``env://``).

    Args:
        backend: ``"gloo"`` or ``"nccl"``; None: :func:`backend_for` ``device``.
        device: the training device (selects the backend, and the current CUDA device for nccl).

    Returns:
        True when running distributed (already initialised or initialised here).
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = backend or backend_for(device)
        if backend == "nccl":
            torch.cuda.set_device(resolve_device(device if device is not None else "cuda"))
        dist.init_process_group(backend=backend)
        return True
    return False


def _collective_device() -> torch.device:
    """Where collectives run: this process's GPU for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum_(tensors: list[Tensor]) -> None:
    """Sum tensors over all processes in place (one flat float64 buffer on the backend's device, one collective);
    no-op in one process. The tensors may live on different devices."""
    _, world = rank_world()
    if world == 1 or not tensors:
        return
    dev = _collective_device()
    flat = torch.cat([t.reshape(-1).to(dev, torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    off = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[off : off + n].reshape(t.shape).to(t.device, t.dtype))
        off += n


def barrier() -> None:
    """Synchronise all processes (no-op in one process)."""
    if rank_world()[1] > 1:
        dist.barrier()


def shard(n: int) -> Tensor:
    """Positions ``0..n-1`` of a global batch that this process handles (contiguous, near-equal shards)."""
    rank, world = rank_world()
    return torch.tensor_split(torch.arange(n), world)[rank]
