"""Checkpoints: atomic save, checked load, RNG state capture/restore."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from workbench.engine.rundir import atomic_torch_save


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or does not fit the model; the message names the file."""


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU (and CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, **payload: Any) -> None:
    """Atomically write a checkpoint dict (temp file + fsync + rename): a crash keeps the previous file."""
    atomic_torch_save(payload, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint on CPU; CheckpointError naming the file when it is missing or unreadable."""
    if not Path(path).is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any decoding failure is reported with the file name
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None


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
