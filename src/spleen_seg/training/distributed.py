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
    # DDP imports torch._dynamo when it wraps a module; imported after the group exists,
    # torch._dynamo keeps references to it (measured: 10) that nothing releases, so the
    # group and its gloo threads outlive destroy_process_group (see there). Imported
    # before, it has no group to hold.
    import torch._dynamo  # noqa: F401

    if torch.cuda.is_available():
        torch.cuda.set_device(rank_device())
        dist.init_process_group(backend="nccl")
    else:
        dist.init_process_group(backend="gloo")


def destroy_process_group(network: torch.nn.Module | None = None) -> None:
    """Leave the group once every rank is done, ending its threads while Python is alive.

    Why: a gloo worker thread frees a finished collective's tensors after the collective
    has returned; tensors that Python has dropped by then need the GIL to be freed. If the
    group is still alive when the interpreter shuts down, that thread asks a finalizing
    interpreter for the GIL, Python ends it with pthread_exit, whose unwinding through
    gloo's C++ destructors calls std::terminate: rank 0 aborted at exit with "terminate
    called without an active exception" (core dump: ProcessGroupGloo::runLoop ->
    ~AsyncAllreduceWork -> THPVariable_dealloc -> take_gil -> PyThread_exit_thread).
    ``dist.destroy_process_group`` alone leaves the group alive while DDP (``network``,
    kept by the bundle's parser until shutdown) holds it, so drop DDP's references too;
    the group is then destroyed here and its worker threads joined.
    """
    if not dist.is_initialized():
        return
    dist.barrier()
    if isinstance(network, DistributedDataParallel):
        # Nothing runs DDP after this; these are the attributes that hold the group.
        for name in ("logger", "reducer", "process_group"):
            if hasattr(network, name):
                delattr(network, name)
    dist.destroy_process_group()
    gc.collect()  # work objects and wrappers in reference cycles hold the group too


def wrap_ddp(module: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP around ``module``; ``device_ids`` only for CUDA (CPU DDP takes none)."""
    if device.type == "cuda":
        return DistributedDataParallel(module, device_ids=[device])
    return DistributedDataParallel(module)
