"""Reading a number the step drew on the host on purpose, without counting it as a device synchronisation.

:func:`host_scalar` is what methods and ops call for their deliberate CPU reads (draws from torch's global CPU
generator, which keep runs reproducible and checkpointable); the counter of :mod:`workbench.engine.syncs` skips
every read made while :func:`exempt` is true.
"""
from __future__ import annotations

from torch import Tensor

_exempt = 0


def exempt() -> bool:
    """Whether a :func:`host_scalar` read is in progress (the synchronisation counter does not count it)."""
    return _exempt > 0


def host_scalar(t: Tensor) -> float | int | bool:
    """The Python number held by the one-element CPU tensor ``t``, not counted by
    :func:`workbench.engine.syncs.host_reads`.

    For values the step draws on the host on purpose (torch's global CPU RNG). Raises ValueError for a tensor on
    another device (that read would be a real synchronisation) or with more than one element.
    """
    global _exempt
    if t.device.type != "cpu" or t.numel() != 1:
        raise ValueError(f"host_scalar reads one-element CPU tensors, got {t.numel()} element(s) on {t.device}")
    _exempt += 1
    try:
        return t.item()
    finally:
        _exempt -= 1


__all__ = ["exempt", "host_scalar"]
