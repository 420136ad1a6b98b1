"""Launching a training run from a notebook's parameters (the write side goes through the engine's CLI)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def train_overrides(method: str, split: str, seed: int = 0, iters: int | None = None, epochs: int | None = None,
                    name: str | None = None, runs: str = "runs", data_root: str | None = None,
                    dataset: str | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Dotted config overrides for a notebook's training parameters (``overrides`` applied last, so it wins).

    ``name`` defaults to ``<method>-<split>-s<seed>``; ``iters`` set = a step schedule, else ``epochs`` (None
    keeps the config's schedule). ``data_root`` / ``dataset`` None keep the config's.
    """
    if iters is not None and epochs is not None:
        raise ValueError("iters and epochs: give one schedule, not both")
    out: dict[str, Any] = {"method.name": method, "data.split": split, "train.seed": seed,
                           "name": name or f"{method}-{split}-s{seed}", "out_dir": runs}
    if iters is not None:
        out["train.iters"] = iters
    if epochs is not None:
        out["train.epochs"] = epochs
        out["train.iters"] = None
    if data_root is not None:
        out["data.root"] = data_root
    if dataset is not None:
        out["data.dataset"] = dataset
    if overrides:
        if not isinstance(overrides, dict):
            raise TypeError(f"overrides must be a dict of dotted keys, got {type(overrides).__name__}")
        out.update(overrides)
    return out


def training_command(overrides: dict[str, Any], config: str | Path | None = None, nproc: int = 2,
                     python: str = sys.executable) -> list[str]:
    """argv of ``workbench train --nproc N`` (torchrun) with each override as ``--set key=<JSON value>``
    (JSON is YAML, which the CLI parses)."""
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an integer >= 1, got {nproc!r}")
    cmd = [python, "-m", "workbench", "train", "--nproc", str(nproc)]
    if config is not None:
        cmd += ["--config", str(config)]
    for k, v in overrides.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    return cmd


def train_run(overrides: dict[str, Any], config: str | Path | None = None, nproc: int = 1) -> Path:
    """Train (or resume) the run described by ``config`` (YAML, optional) + dotted ``overrides``; returns its run
    directory. ``nproc`` 1 trains in this process; > 1 launches ``workbench train --nproc`` (torchrun/DDP),
    streaming its output, and raises RuntimeError with its last lines when it fails. The config is validated
    first (ConfigError) either way."""
    from workbench.config import load_config

    cfg = load_config(config, dict(overrides))
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an integer >= 1, got {nproc!r}")
    if nproc == 1:
        from workbench.engine.trainer import train

        train(cfg)
        return cfg.run_dir
    proc = subprocess.Popen(training_command(overrides, config, nproc), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        print(line, end="")
        tail = (tail + [line])[-20:]
    if proc.wait() != 0:
        raise RuntimeError(f"workbench train --nproc {nproc} failed (exit {proc.returncode}):\n{''.join(tail)}")
    return cfg.run_dir
