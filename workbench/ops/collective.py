"""Sums over the processes of a distributed run (a no-op in a single process)."""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes when torch.distributed is initialised; return it unchanged otherwise.

    With the NCCL backend a CPU tensor is moved to the current CUDA device for the reduction and moved back.
    Returns the reduced tensor on the input's device (the input may or may not be modified in place).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    work = tensor
    if "nccl" in str(dist.get_backend()).lower() and not tensor.is_cuda:
        work = tensor.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


__all__ = ["all_reduce_sum"]
