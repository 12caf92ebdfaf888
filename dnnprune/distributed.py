"""Running one command as several processes under `torchrun`, and tuning the process that owns the run.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; a plain run is rank 0 of 1. Work is shared out by
estimated cost (longest first, deterministic, so every process agrees on its share without talking)
and the results gathered back, so every process ends up with the same, complete answer. The CPU uses
the gloo backend, CUDA uses NCCL with one GPU per local process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from dnnprune.errors import DnnpruneError

T = TypeVar("T")


def distributed_env() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def process_device(device: torch.device, world: int) -> torch.device:
    """Under torchrun each process on a machine takes its own GPU (LOCAL_RANK); the CPU is shared.

    NCCL refuses two processes on one GPU (a traceback from every rank, deep in the first collective),
    so more processes on this machine than GPUs, or several processes with one GPU named, is refused
    here in one line."""
    if device.type != "cuda" or world <= 1:
        return device
    local, gpus = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count()
    if device.index is not None:
        if local > 1:
            raise DnnpruneError(f"torchrun started {local} processes on this machine and --device names one GPU "
                                f"({device}), but NCCL needs a GPU per process; pass --device cuda (each process "
                                "takes its own) or cpu")
        return device  # one process on this machine: the GPU it was told to use
    if local > gpus:
        raise DnnpruneError(f"torchrun started {local} processes on this machine, which has {gpus} GPU(s), and NCCL "
                            f"needs a GPU per process; start at most {gpus} (--nproc-per-node) or pass --device cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(world: int, device: torch.device | None = None) -> bool:
    """Join torchrun's process group; True if this call started it (the caller then leaves it)."""
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    device = device or torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL gathers objects through the current device
    dist.init_process_group(backend_for(device))
    return True


def leave_distributed(completed: bool) -> None:
    """Destroy the process group; after a completed run only once every process is done with it:
    a group torn down on one side while the other still holds its connection can abort the other."""
    if completed:
        dist.barrier()
    dist.destroy_process_group()


def gather(value: T, world: int) -> list[T]:
    """Every process's `value`, in rank order (just `[value]` for a plain run)."""
    if world <= 1:
        return [value]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, value)
    return gathered


def share_by_cost(items: Sequence[T], cost: Callable[[T], float], world: int,
                  key: Callable[[T], Hashable] = repr) -> list[list[T]]:
    """Longest-processing-time-first split of `items` into `world` shares of similar total cost.

    Deterministic (ties broken by `key`), so every process computes the same split on its own.
    """
    shares: list[list[T]] = [[] for _ in range(world)]
    load = [0.0] * world
    for item in sorted(items, key=lambda i: (-cost(i), key(i))):
        target = min(range(world), key=lambda r: (load[r], r))
        shares[target].append(item)
        load[target] += cost(item)
    return shares


def tune_malloc() -> bool:
    """Let glibc keep freed activation memory instead of returning it to the OS after every layer.

    Evaluation loops allocate the same large activations thousands of times; with glibc's defaults the
    big ones are fresh mmaps whose page faults cost ~10% of a sensitivity analysis on a VM. Process-wide,
    so only a command-line entry (which owns the process) calls it. False where glibc is absent.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not name.startswith("libc.so"):
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all([mallopt(m_mmap_threshold, 32 << 20) == 1, mallopt(m_trim_threshold, 1 << 30) == 1,
                mallopt(m_top_pad, 64 << 20) == 1])
