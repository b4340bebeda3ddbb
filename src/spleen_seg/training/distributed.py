"""torch.distributed glue for the multi-GPU bundle configs (torchrun).

On CUDA each rank drives the GPU of its LOCAL_RANK with NCCL; without CUDA the same
configs run on CPU processes with gloo, which is how CI tests them with two ranks.
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def rank_device() -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` when CUDA exists, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device(f"cuda:{local_rank()}")
    return torch.device("cpu")


def init_process_group() -> None:
    """Join the torchrun process group (NCCL on GPUs, gloo on CPU); idempotent."""
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(rank_device())
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")


def destroy_process_group() -> None:
    """Leave the group once every rank is done: a rank tearing gloo down while rank 0 still
    writes its gathered metrics made rank 0 abort at exit ("terminate called ...")."""
    if dist.is_initialized():
        # Free finished collectives' work objects (they hold tensors) while the interpreter
        # is fully alive: gloo freeing them during interpreter teardown can abort the process.
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP around ``module``; ``device_ids`` only for CUDA (CPU DDP takes none)."""
    if device.type == "cuda":
        return DistributedDataParallel(module, device_ids=[device])
    return DistributedDataParallel(module)
