"""Optimisation helpers: lr scaling rule, poly decay, SGD over param groups, EMA."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import nn


def scaled_lr(lr: float, batch: int, reference: int, rule: str = "linear") -> float:
    """The lr for ``batch`` labeled images per optimiser step, given ``lr`` tuned for ``reference`` images.

    ``linear``: lr x batch / reference (Goyal et al., 2017); ``sqrt``: lr x sqrt(batch / reference); ``none``: lr.
    The papers' lr is for 8 labeled (+8 unlabeled) images per step over all GPUs, so e.g. one GPU with batch 4 and
    grad_accum 2 keeps the papers' lr, and batch 4 without accumulation halves it under the linear rule.
    """
    if batch <= 0 or reference <= 0:
        raise ValueError(f"batch and reference must be positive, got {batch}, {reference}")
    if rule == "linear":
        return lr * batch / reference
    if rule == "sqrt":
        return lr * math.sqrt(batch / reference)
    if rule == "none":
        return lr
    raise ValueError(f"unknown lr scaling rule {rule!r} (linear, sqrt, none)")


def poly_factor(iteration: int, total: int, power: float = 0.9) -> float:
    """Poly decay factor (1 - iteration / total) ** power, for 0 <= iteration <= total."""
    if total <= 0 or not 0 <= iteration <= total:
        raise ValueError(f"need 0 <= iteration <= total and total > 0, got {iteration}, {total}")
    return (1 - iteration / total) ** power


def set_poly_lr(optimizer: torch.optim.Optimizer, iteration: int, total: int, power: float = 0.9) -> None:
    """Set every ``poly`` group's lr to base_lr x poly_factor; groups with ``poly: False`` keep base_lr."""
    f = poly_factor(iteration, total, power)
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * (f if g.get("poly", True) else 1.0)


def build_sgd(groups: list[dict[str, Any]], momentum: float, weight_decay: float,
              fused: bool | None = None) -> torch.optim.SGD:
    """SGD over the method's param groups (each with ``lr``/``base_lr``); empty groups dropped."""
    groups = [g for g in groups if g["params"]]
    seen: set[int] = set()
    for g in groups:
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError(f"parameter in two groups (group {g.get('name')})")
            seen.add(id(p))
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum, weight_decay=weight_decay, fused=fused)


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


def count_parameters(params: Iterable[torch.nn.Parameter]) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in params)
