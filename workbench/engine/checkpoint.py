"""Checkpoints: data only (never code), atomic, checksummed, with the previous good ``latest`` kept.

A checkpoint is ``torch.save`` of a dict of tensors and plain Python values (dicts, lists, tuples, str, numbers,
None). It is read with ``torch.load(weights_only=True)``, which refuses anything else: a crafted file cannot run
code. Beside every checkpoint ``X.pt`` lies ``X.pt.sha256`` (``sha256sum`` format, so ``sha256sum -c`` checks it);
loading verifies it, so damage anywhere in the file (even inside tensor data, which
the zip container does not check) is refused.

``latest.pt`` keeps its predecessor as ``latest.prev.pt`` (with its own checksum; see :func:`save_checkpoint`
for the order of the writes). A file is accepted when its hash is one recorded for its slot (``latest.pt.sha256``
or ``latest.prev.pt.sha256``), so a kill between any two steps leaves at least one verified file, and
:func:`load_latest` falls back to the previous file (with a message naming both) when ``latest.pt`` is missing,
damaged or unreadable.

Checkpoints written before checksums existed (no ``.sha256`` beside them) still load through ``weights_only=True``.
Older ones that hold numpy arrays (the numpy RNG state) are refused with a one-line message; ``trust_pickle=True``
(``--trust-pickle`` on the command line) loads such a file with full unpickling, for files the user vouches for.
"""
from __future__ import annotations

import hashlib
import os
import random
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workbench.engine.rundir import atomic_write_text, fsync_dir, write_temp


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message names the file."""


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA) generator states, as plain values and tensors (weights_only-loadable)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (also the numpy tuple of older checkpoints)."""
    random.setstate(state["python"])
    npst = state["numpy"]
    if isinstance(npst, dict):
        npst = (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                npst["cached_gaussian"])
    np.random.set_state(npst)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checksum_path(path: Path) -> Path:
    """``X.pt`` -> ``X.pt.sha256``."""
    return path.with_name(path.name + ".sha256")


def previous_path(path: Path) -> Path:
    """``latest.pt`` -> ``latest.prev.pt`` (the previous good file kept by :func:`save_checkpoint`)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _read_checksums(path: Path) -> list[str]:
    """The hashes recorded in ``X.pt.sha256`` (one while idle; two, new then old, while a save is under way)."""
    try:
        lines = checksum_path(path).read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        tok = line.split()
        if tok and len(tok[0]) == 64:
            out.append(tok[0].lower())
    return out


def save_checkpoint(path: Path, keep_previous: bool = False, **payload: Any) -> None:
    """Atomically write a checkpoint dict and its ``.sha256``; ``keep_previous`` keeps the file it replaces as
    ``<stem>.prev.pt``.

    Order (a kill between any two steps leaves a file whose hash is recorded for its slot): (1) temp file written,
    fsynced and hashed; (2) the checksum file lists the new hash and the old one; (3) with ``keep_previous`` the
    old file becomes ``.prev.pt`` and gets its own checksum; (4) the temp file is renamed into place; (5) the
    checksum file lists only the new hash."""
    path = Path(path)
    tmp = write_temp(lambda f: torch.save(payload, f), path)
    try:
        new = sha256_file(tmp)
        old = sha256_file(path) if path.is_file() else None
        recorded = _read_checksums(path)
        good = old is not None and (old in recorded or not recorded)   # a damaged file never becomes the previous
        atomic_write_text(checksum_path(path), f"{new}  {path.name}\n" + (f"{old}  {path.name}\n" if good else ""))
        if keep_previous and good:
            prev = previous_path(path)
            os.replace(path, prev)
            atomic_write_text(checksum_path(prev), f"{old}  {prev.name}\n")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    atomic_write_text(checksum_path(path), f"{new}  {path.name}\n")


def load_checkpoint(path: Path, trust_pickle: bool = False, accept: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a checkpoint on CPU as data (``weights_only=True``), verifying its recorded sha256.

    ``accept``: further hashes that count as recorded (the sibling's, see the module docstring). CheckpointError
    naming the file when it is missing, damaged (hash mismatch), unreadable, or needs full unpickling without
    ``trust_pickle``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    recorded = {*_read_checksums(path), *accept}
    if recorded and not trust_pickle:
        actual = sha256_file(path)
        if actual not in recorded:
            raise CheckpointError(f"checkpoint {path} is damaged: its sha256 {actual[:12]}... differs from the one "
                                  f"recorded in {checksum_path(path).name}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        glob = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if glob is None:
            raise CheckpointError(f"cannot read checkpoint {path}: {_reason(e)}") from None
        if not trust_pickle:
            raise CheckpointError(
                f"checkpoint {path} holds Python objects beyond tensors and plain values ({glob.group(1)}: an older "
                "checkpoint, or a crafted file); it was not loaded. If you made this file yourself and trust it, "
                "rerun with --trust-pickle") from None
        try:
            ck = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise CheckpointError(f"cannot read checkpoint {path}: {_reason(e2)}") from None
    if not isinstance(ck, dict):
        raise CheckpointError(f"checkpoint {path}: expected a dict, got {type(ck).__name__}")
    return ck


def load_latest(path: Path, trust_pickle: bool = False) -> tuple[dict[str, Any], Path]:
    """Load ``latest.pt``, falling back to ``latest.prev.pt`` (with a message on stderr naming both files) when the
    latest is missing, damaged or unreadable; returns (checkpoint, the file used). CheckpointError naming both
    files when neither loads."""
    path = Path(path)
    prev = previous_path(path)
    accept = (*_read_checksums(path), *_read_checksums(prev))
    try:
        return load_checkpoint(path, trust_pickle, accept), path
    except CheckpointError as e:
        if not prev.is_file():
            raise
        try:
            ck = load_checkpoint(prev, trust_pickle, accept)
        except CheckpointError as e2:
            raise CheckpointError(f"{e}; the previous checkpoint cannot be used either: {e2}") from None
        print(f"workbench: warning: {e}; resuming from the previous checkpoint {prev} (step {ck.get('step')})",
              file=sys.stderr)
        return ck, prev


def latest_exists(path: Path) -> bool:
    """Whether ``latest.pt`` or its kept predecessor exists (a run to resume)."""
    return Path(path).is_file() or previous_path(Path(path)).is_file()


def nonfinite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict holding NaN or inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _reason(e: BaseException) -> str:
    """A one-line reason for a failed ``torch.load`` (the unpickler's own words, not torch's advice)."""
    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    if m:
        text = m.group(1)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def load_state_checked(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """``load_state_dict`` (strict) with an error naming the file and the first mismatching keys/shapes."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}")
        raise CheckpointError(f"checkpoint {path} does not fit this model ({'; '.join(parts)}): it was written by "
                              "a different model/method configuration")
    module.load_state_dict(state)
