"""Counting a training step's device-to-host reads (the host synchronisations of a GPU step).

On CUDA, every ``tensor.item()``, ``bool(tensor)``, ``int(tensor)``, ``float(tensor)``, ``tensor.tolist()`` or
``tensor.nonzero()`` on a device tensor makes the host wait for the GPU: the queue of launched kernels drains and the
GPU idles while Python catches up. A step without such reads lets the host run ahead. ``torch.cuda`` has
``set_sync_debug_mode`` for this, but only on a GPU; :func:`host_reads` counts the same Python-level reads on any
device, so the tests hold every method's steady-state step to its budget on a CPU-only machine, and ``workbench
bench`` reports ``host_reads_per_step``.

Reads the code makes on purpose from CPU tensors (random draws from torch's global CPU generator, which keep runs
reproducible and checkpointable) go through :func:`host_scalar`, which is never counted: on a GPU those are not
synchronisations. What :func:`host_reads` cannot see: reads inside C++ (boolean-mask indexing ``x[mask]`` and
``torch.unique`` synchronise on CUDA without a Python call); the hot paths avoid them by construction.
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from torch import Tensor

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero")
"""The Tensor methods counted as host reads."""

_PACKAGE = str(Path(__file__).resolve().parents[1])
_exempt = 0


def host_scalar(t: Tensor) -> float | int | bool:
    """The Python number held by the one-element CPU tensor ``t``, not counted by :func:`host_reads`.

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


def _caller() -> str:
    """``path:line`` of the innermost frame in the workbench package (else the innermost outside torch)."""
    frame = sys._getframe(2)
    fallback = None
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_PACKAGE) and not name.endswith("syncs.py"):
            return f"workbench/{Path(name).relative_to(_PACKAGE).as_posix()}:{frame.f_lineno}"
        if fallback is None and "torch" not in Path(name).parts:
            fallback = f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return fallback or "?"


@contextlib.contextmanager
def host_reads() -> Iterator[Counter]:
    """Count the device-to-host reads made inside the block.

    Yields a ``Counter`` keyed by ``"<op> at <path:line>"`` (the innermost workbench frame making the read), filled
    as the block runs. Every tensor counts whatever its device (on a CPU-only machine the reads a GPU step would make
    are the same calls); :func:`host_scalar` reads do not. The Tensor methods of :data:`READS` are wrapped for the
    duration and restored on exit, also on error. Not thread-safe (do not count in two threads at once).
    """
    counts: Counter = Counter()
    originals = {name: getattr(Tensor, name) for name in READS}
    own = {name for name in READS if name in Tensor.__dict__}   # the rest are inherited from the C base class

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            if not _exempt:
                counts[f"{name} at {_caller()}"] += 1
            return fn(self, *args, **kwargs)
        counted.__name__ = name
        return counted

    for name, fn in originals.items():
        setattr(Tensor, name, wrap(name, fn))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            if name in own:
                setattr(Tensor, name, fn)
            else:
                delattr(Tensor, name)


__all__ = ["READS", "host_reads", "host_scalar"]
