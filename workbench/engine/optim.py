"""Optimisation helpers: lr scaling rule, poly decay, SGD over param groups, EMA, the sync-free non-finite check."""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from workbench.ops.ema import ema_update  # noqa: F401  (re-exported: the EMA lives in ops)


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


class SkippableSGD(torch.optim.SGD):
    """``torch.optim.SGD`` that skips a step flagged on the device with any kernel, without a host read.

    Set ``found_inf`` (a float tensor of one element, nonzero = skip; :class:`DeferredNonFinite` does) before
    :meth:`step`. The fused kernel reads it itself. The per-tensor (foreach) kernel cannot: there the step runs and
    is then undone on the device where ``found_inf`` is set, from a copy of the parameters and momentum buffers taken
    just before (one extra copy of each in memory; give every parameter a momentum buffer first, see
    :func:`zero_momentum_buffers`). Without ``found_inf`` it is the plain SGD.
    """

    _copies: list[Tensor] | None = None

    @torch.no_grad()
    def step(self, closure=None):
        found_inf = self.__dict__.get("found_inf")
        if found_inf is None or self.defaults.get("fused"):
            return super().step(closure)
        live = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        live += [b for p in live if (b := self.state[p].get("momentum_buffer")) is not None]
        if self._copies is None or [c.shape for c in self._copies] != [t.shape for t in live]:
            self._copies = [torch.empty_like(t) for t in live]
        if live:
            torch._foreach_copy_(self._copies, live)
        del self.found_inf   # torch's per-tensor kernel refuses it
        try:
            loss = super().step(closure)
        finally:
            self.found_inf = found_inf
        keep = found_inf.reshape(()) == 0
        for t, old in zip(live, self._copies):
            t.copy_(torch.where(keep.to(t.device), t, old))
        return loss


def build_sgd(groups: list[dict[str, Any]], momentum: float, weight_decay: float,
              fused: bool | None = None) -> torch.optim.SGD:
    """SGD over the method's param groups (each with ``lr``/``base_lr``); empty groups dropped. A
    :class:`SkippableSGD`: the same steps, plus the on-device skip of a flagged step with either kernel."""
    groups = [g for g in groups if g["params"]]
    seen: set[int] = set()
    for g in groups:
        for p in g["params"]:
            if id(p) in seen:
                raise ValueError(f"parameter in two groups (group {g.get('name')})")
            seen.add(id(p))
    return SkippableSGD(groups, lr=groups[0]["lr"], momentum=momentum, weight_decay=weight_decay, fused=fused)


def count_parameters(params: Iterable[torch.nn.Parameter]) -> int:
    """Number of scalar parameters."""
    return sum(p.numel() for p in params)


def fused_choice(fused: bool | None, device: torch.device) -> bool | None:
    """``optim.fused`` -> the ``fused`` argument of SGD: True, None for False (the foreach loop), and for None
    (automatic) True on CUDA and CPU, the devices whose fused SGD kernel is in every supported torch."""
    if fused is None:
        return True if device.type in ("cuda", "cpu") else None
    return True if fused else None


def all_finite(loss: Tensor, params: Iterable[torch.nn.Parameter]) -> Tensor:
    """bool 0-d tensor on the loss's device: the loss and every existing gradient are finite (no host read).

    One ``_foreach_norm(ord=inf)`` pass (the largest absolute value per gradient: finite exactly when the whole
    gradient is, and it cannot overflow) instead of one kernel per parameter."""
    grads = [p.grad for p in params if p.grad is not None]
    ok = torch.isfinite(loss.detach()).all()
    if grads:
        ok = ok & torch.isfinite(torch.stack(torch._foreach_norm(grads, ord=float("inf")))).all().to(ok.device)
    return ok


def zero_momentum_buffers(optimizer: torch.optim.SGD) -> None:
    """Give every parameter of a momentum SGD a zero momentum buffer before its first step.

    The fused SGD kernel allocates the buffer on the first step and copies the gradient into it; when that first
    step is skipped through ``found_inf`` the buffer stays uninitialised memory (measured on torch 2.14 CPU). A
    zero buffer gives the same first step (``buf = 0.9 * 0 + grad`` = ``grad`` with no dampening) and makes a
    skipped first step harmless. Parameters that already have a buffer (a resumed run) keep it."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0) and not group.get("dampening", 0):
            for p in group["params"]:
                state = optimizer.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


class DeferredNonFinite:
    """Non-finite training steps detected on the device and read by the host only at logging time.

    :meth:`flag` (once per step, no host read) computes :func:`all_finite`, hands the optimiser ``found_inf`` (the
    fused SGD kernel, or :class:`SkippableSGD` with the per-tensor kernel, then leaves weights and momentum
    untouched on a bad step) and remembers, on the device, how
    many steps were bad and the loss terms of the first; :meth:`read` (one host read) returns ``(first step, count,
    loss terms, batch ids of the first)`` since the previous read, or None when every step was finite.

    It also counts consecutive bad steps on the device (across reads): after :meth:`read`, ``max_streak_read`` is the
    longest run of consecutive bad steps ending in the period read (0 when none) and ``last_step_read`` the 1-based
    index of the last step read.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.streak = torch.zeros((), dtype=torch.long, device=device)
        self.max_streak_read = 0
        self.last_step_read = 0
        self._reset()

    def _reset(self) -> None:
        self.count = torch.zeros((), dtype=torch.long, device=self.device)
        self.first = torch.full((), -1, dtype=torch.long, device=self.device)
        self.terms: dict[str, Tensor] = {}
        self.ids: dict[int, list[str]] = {}
        self.max_streak = torch.zeros((), dtype=torch.long, device=self.device)

    def flag(self, optimizer: torch.optim.Optimizer, loss: Tensor, params: Iterable[torch.nn.Parameter], step: int,
             logs: dict[str, Tensor], ids: list[str]) -> Tensor:
        """Flag this step; returns the bool 0-d ``good`` tensor (True = finite, the update will be applied)."""
        good = all_finite(loss, params).to(self.device)
        bad = ~good
        optimizer.found_inf = bad.float().reshape(1)   # read by the fused SGD kernel / SkippableSGD.step
        new_first = bad & (self.first < 0)
        self.first = torch.where(new_first, step, self.first)
        for k, v in logs.items():
            v = v.detach().float().to(self.device)
            self.terms[k] = torch.where(new_first, v, self.terms.get(k, torch.zeros_like(v)))
        self.count = self.count + bad
        self.streak = torch.where(bad, self.streak + 1, 0)
        self.max_streak = torch.maximum(self.max_streak, self.streak)
        self.ids[step] = list(ids)
        return good

    def read(self) -> tuple[int, int, dict[str, float], list[str]] | None:
        """The verdict since the last read (see the class docstring); resets the record."""
        if not self.ids:
            return None
        count, self.max_streak_read = (int(v) for v in torch.stack([self.count, self.max_streak]).cpu())
        self.last_step_read = max(self.ids) + 1
        result = None
        if count:
            first = int(self.first)
            result = (first, count, {k: float(v) for k, v in self.terms.items()}, self.ids.get(first, []))
        self._reset()
        return result
