"""Exponential moving average of a network's weights (mean teachers, EMA class heads)."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, alpha: float) -> None:
    """teacher <- alpha * teacher + (1 - alpha) * student for parameters; buffers (BN statistics) too.

    Integer buffers (BN's num_batches_tracked) are copied from the student.
    """
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(alpha).add_(s.detach(), alpha=1 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.dtype.is_floating_point:
            t.mul_(alpha).add_(s.detach(), alpha=1 - alpha)
        else:
            t.copy_(s)


__all__ = ["ema_update"]
