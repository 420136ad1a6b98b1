"""Distributed training helpers (torchrun / DDP; NCCL on CUDA, gloo on CPU).

``workbench train --nproc N`` re-launches itself through torchrun; inside each process :func:`init_from_env` reads
torchrun's environment. Only rank 0 writes to the run directory.
"""
from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from torch import Tensor, nn


def world_size() -> int:
    """Number of processes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0."""
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group described by torchrun's env vars (WORLD_SIZE > 1); returns True when distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def local_device(requested: str) -> torch.device:
    """``auto`` -> this process's CUDA device when present, else CPU; otherwise the requested device."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from workbench.config import ConfigError

        raise ConfigError(f"train.device={requested!r} but CUDA is not available; use 'auto' or 'cpu'")
    return dev


def broadcast_object(obj):
    """Rank 0's ``obj`` on every process."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GlooSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are synchronised across processes on any device.

    ``nn.SyncBatchNorm`` only runs on GPUs; this differentiable all-reduce of (sum, sum of squares, count) gives the
    same normalisation on CPU/gloo, so a 2-process CPU run matches a 1-process run on the global batch.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        c = x.shape[1]
        xf = x.float()
        n = torch.tensor([x.numel() / c], dtype=torch.float32, device=x.device)
        stats = all_reduce(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), n]))
        total = stats[-1]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp(min=0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * total / (total - 1).clamp(min=1), alpha=m)
                self.num_batches_tracked.add_(1)
        y = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """torch's SyncBatchNorm on CUDA; :class:`GlooSyncBatchNorm` elsewhere (all BatchNorm2d layers replaced)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, GlooSyncBatchNorm):
            new = GlooSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats)
            new.load_state_dict(child.state_dict())
            new.to(next(child.buffers(), torch.empty(0)).device)
            setattr(module, name, new)
        else:
            convert_sync_batchnorm(child, device)
    return module
