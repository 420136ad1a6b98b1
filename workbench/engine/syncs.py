"""Counting a training step's host synchronisations (device-to-host reads), on any device.

On CUDA the host waits for the GPU whenever it needs a value that only the device knows: a Python read
(``tensor.item()``, ``bool(tensor)``, ``int(tensor)``, ``float(tensor)``, ``tensor.tolist()``, ``.numpy()``,
``.cpu()``), and every operation whose *output size* depends on the data, because the allocation needs that size on
the host: ``nonzero`` (also ``torch.where(mask)``, ``argwhere``), ``masked_select``, ``unique`` and
``unique_consecutive``, indexing with a boolean mask (``x[mask]``) and assigning through one (``x[mask] = v``, also
in the backward of ``x[mask]``), ``repeat_interleave`` with tensor repeats and no ``output_size``, ``bincount``,
``histc`` without a range, ``torch.equal``, and ``masked_fill`` with a tensor value (read on the host). The queue of
launched kernels drains and the GPU idles while Python catches up; a step without any lets the host run ahead.

:func:`host_reads` sees all of them, on the CPU as well, so the tests hold every method's step to a budget on a
CPU-only machine: a ``TorchDispatchMode`` watches every ATen operation the block runs (backward included) and counts
the ones above by their arguments; the Python reads that never reach the dispatcher (``tolist``, ``numpy``, ``cpu``)
are counted by wrapping those Tensor methods for the duration. Every tensor counts whatever its device: on a CPU-only
machine the calls a GPU step would make are the same. On a GPU, ``torch.cuda.set_sync_debug_mode`` gives the
independent cross-check (``benchmarks/gpu_session.sh syncs``).

Reads the code makes on purpose from CPU tensors (random draws from torch's global CPU generator, which keep runs
reproducible and checkpointable) go through :func:`host_scalar` (:mod:`workbench.ops.host`), which is never
counted: on a GPU those are not synchronisations. Known blind spots: operations run inside a ``torch.compile``d
graph, collectives of ``torch.distributed``, and explicit ``torch.cuda.synchronize()`` / event waits.
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from workbench.ops.host import exempt, host_scalar

PYTHON_READS = ("tolist", "numpy", "cpu")
"""Tensor methods counted at the Python level (they read device memory without an ATen operation on the CPU)."""

SYNC_OPS = ("item", "nonzero", "masked_select", "unique", "unique_consecutive", "index (bool mask)",
            "index_put (bool mask)", "repeat_interleave", "bincount", "histc", "equal", "masked_fill (tensor value)")
"""The names under which :func:`host_reads` counts the synchronising ATen operations (``item`` stands for every
scalar read: ``.item()``, ``bool()``, ``int()``, ``float()``, ``__index__``)."""

_OPS = {
    "_local_scalar_dense": "item", "nonzero": "nonzero", "masked_select": "masked_select",
    "_unique": "unique", "_unique2": "unique", "unique_dim": "unique", "unique_consecutive": "unique_consecutive",
    "unique_dim_consecutive": "unique_consecutive", "bincount": "bincount", "equal": "equal",
}
_BOOL_INDEXED = {"index": "index (bool mask)", "index_put": "index_put (bool mask)",
                 "index_put_": "index_put (bool mask)", "_index_put_impl_": "index_put (bool mask)"}

_PACKAGE = str(Path(__file__).resolve().parents[1])
_SELF = str(Path(__file__).resolve())


def _caller() -> str:
    """``path:line`` of the innermost frame in the workbench package (else the innermost outside torch)."""
    frame = sys._getframe(2)
    fallback = None
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_PACKAGE) and name != _SELF:
            return f"workbench/{Path(name).relative_to(_PACKAGE).as_posix()}:{frame.f_lineno}"
        if fallback is None and "torch" not in Path(name).parts and name != _SELF:
            fallback = f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return fallback or "?"


def _bool_index(indices: Any) -> bool:
    return any(isinstance(i, Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def sync_op(func: Any, args: tuple, kwargs: dict) -> str | None:
    """The :data:`SYNC_OPS` name of an ATen call that synchronises on CUDA, or None (``func`` an OpOverload)."""
    name = func._schema.name.split("::")[-1]
    if name in _OPS:
        return _OPS[name]
    if name in _BOOL_INDEXED:
        return _BOOL_INDEXED[name] if _bool_index(args[1] if len(args) > 1 else kwargs.get("indices")) else None
    if name == "repeat_interleave":
        tensor_repeats = any(isinstance(a, Tensor) for a in args[:2]) or isinstance(kwargs.get("repeats"), Tensor)
        return "repeat_interleave" if tensor_repeats and kwargs.get("output_size") is None else None
    if name == "histc":   # without a range the kernel reads the data's min and max on the host
        lo = args[2] if len(args) > 2 else kwargs.get("min", 0)
        hi = args[3] if len(args) > 3 else kwargs.get("max", 0)
        return "histc" if lo == hi else None
    if name in ("masked_fill", "masked_fill_") and len(args) > 2 and isinstance(args[2], Tensor):
        return "masked_fill (tensor value)"
    return None


class _SyncMode(TorchDispatchMode):
    """Counts the synchronising ATen operations into ``counts`` (see :func:`host_reads`)."""

    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = sync_op(func, args, kwargs)
        if op is not None and not exempt():
            self.counts[f"{op} at {_caller()}"] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_reads() -> Iterator[Counter]:
    """Count the host synchronisations made inside the block (forward, backward, optimiser: all ATen operations).

    Yields a ``Counter`` keyed by ``"<op> at <path:line>"`` (``op`` one of :data:`SYNC_OPS` or
    :data:`PYTHON_READS`; the site is the innermost workbench frame making the call), filled as the block runs.
    Every tensor counts whatever its device; :func:`host_scalar` reads do not. The Tensor methods of
    :data:`PYTHON_READS` are wrapped for the duration and restored on exit, also on error. Not thread-safe (do not
    count in two threads at once).
    """
    counts: Counter = Counter()
    originals = {name: getattr(Tensor, name) for name in PYTHON_READS}
    own = {name for name in PYTHON_READS if name in Tensor.__dict__}   # the rest are inherited from the C base class

    def wrap(name, fn):
        def counted(self, *args, **kwargs):
            if not exempt():
                counts[f"{name} at {_caller()}"] += 1
            return fn(self, *args, **kwargs)
        counted.__name__ = name
        return counted

    for name, fn in originals.items():
        setattr(Tensor, name, wrap(name, fn))
    try:
        with _SyncMode(counts):
            yield counts
    finally:
        for name, fn in originals.items():
            if name in own:
                setattr(Tensor, name, fn)
            else:
                delattr(Tensor, name)


def count_by_op(counts: Counter) -> dict[str, int]:
    """Sum a :func:`host_reads` counter per operation (the part of each key before `` at ``)."""
    out: Counter = Counter()
    for key, n in counts.items():
        out[key.split(" at ")[0]] += n
    return dict(out)


__all__ = ["PYTHON_READS", "SYNC_OPS", "count_by_op", "host_reads", "host_scalar", "sync_op"]
