"""One run directory read into a :class:`Run`: its resolved config (nested dict), its ``summary.json`` (None while
unfinished) and lazy access to ``metrics.jsonl`` and captured artifacts (layout: :mod:`workbench.engine.rundir`).
Values are looked up with dotted keys by :func:`lookup`: first in the summary (``best.miou``, ``final.fg_iou``,
``steps``, ``timing.seconds_total``), then in the config (``method.name``, ``data.split``, ``train.seed``). Also the
run's dataset (class names and palette: :func:`dataset_meta`) and validation samples."""
from __future__ import annotations

import fnmatch
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from workbench.engine.rundir import RunDir
from workbench.runfiles import discover_runs


@dataclass
class Run:
    """One run directory: its name, path, resolved config (nested dict) and summary (None until written)."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None

    @property
    def name(self) -> str:
        """The run directory's name."""
        return self.path.name

    @property
    def dir(self) -> RunDir:
        """The :class:`~workbench.engine.rundir.RunDir` (paths and readers)."""
        return RunDir(self.path)

    def metrics(self, kind: str | None = None) -> list[dict[str, Any]]:
        """metrics.jsonl records, optionally only ``kind`` ("train" or "eval")."""
        return self.dir.read_metrics(kind)

    def get(self, key: str, default: Any = None) -> Any:
        """:func:`lookup` of ``key`` in this run."""
        return lookup(self, key, default)


def _dig(d: Any, parts: Sequence[str]) -> tuple[bool, Any]:
    for p in parts:
        if not isinstance(d, dict) or p not in d:
            return False, None
        d = d[p]
    return True, d


def lookup(run: Run, key: str, default: Any = None) -> Any:
    """Value of dotted ``key`` in the run's summary, else in its config, else ``default``.

    E.g. ``best.miou``, ``final.iou`` (list per class), ``timing.seconds_total`` from summary.json;
    ``method.name``, ``data.split``, ``method.tau`` from config.yaml.
    """
    parts = key.split(".")
    for source in (run.summary, run.config):
        found, v = _dig(source, parts)
        if found:
            return v
    return default


def load_run(path: str | Path) -> Run:
    """Read one run directory (ValueError when ``path`` has no config.yaml, or when its config.yaml or
    summary.json cannot be read: the message names the file)."""
    rd = RunDir(path)
    if not rd.config.is_file():
        raise ValueError(f"path: {rd.path} is not a run directory (no config.yaml)")
    try:
        config = yaml.safe_load(rd.config.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{rd.config}: unreadable ({type(e).__name__}: {e})") from None
    try:
        summary = json.loads(rd.summary.read_text()) if rd.summary.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{rd.summary}: unreadable ({type(e).__name__}: {e})") from None
    return Run(rd.path, config, summary)


def load_runs(runs_dir: str | Path = "runs", pattern: str = "*", errors: str = "raise") -> list[Run]:
    """Every run under ``runs_dir`` (:func:`discover_runs`) with a config.yaml whose path relative to ``runs_dir``
    matches the glob ``pattern`` (``*`` also crosses ``/``), sorted by that path.

    FileNotFoundError when ``runs_dir`` does not exist; an empty list when it holds no run. A run whose
    config.yaml or summary.json cannot be read raises (``errors="raise"``) or is skipped with a warning naming
    the file (``errors="warn"``).
    """
    if errors not in ("raise", "warn"):
        raise ValueError(f"errors must be 'raise' or 'warn', got {errors!r}")
    root = Path(runs_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"runs_dir: {root} is not a directory")
    out = []
    for name in discover_runs(root):
        p = root / name
        if not fnmatch.fnmatchcase(name, pattern) or not (p / "config.yaml").is_file():
            continue
        try:
            out.append(load_run(p))
        except ValueError as e:
            if errors == "raise":
                raise
            warnings.warn(f"skipping run {p.name}: {e}", stacklevel=2)
    return out


def metrics_frame(run: Run, kind: str = "train", keys: Sequence[str] | None = None) -> dict[str, list[Any]]:
    """Columns of the run's ``kind`` records: ``{"step": [...], key: [...], ...}`` (None where a record lacks it).

    ``keys`` None = every key holding a number in some record (not "kind", "epoch", lists or dicts).
    """
    if kind not in ("train", "eval"):
        raise ValueError(f"kind must be 'train' or 'eval', got {kind!r}")
    recs = run.metrics(kind)
    if keys is None:
        seen: dict[str, None] = {}
        for r in recs:
            for k, v in r.items():
                if k not in ("kind", "step", "epoch") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    seen[k] = None
        keys = list(seen)
    return {"step": [r["step"] for r in recs], **{k: [r.get(k) for r in recs] for k in keys}}


def logged_keys(run: Run, kind: str = "train", exclude: Sequence[str] = ("lr", "seconds", "num_images")
                ) -> list[str]:
    """Numeric keys the run logged in ``kind`` records (first-seen order), except ``exclude``."""
    return [k for k in metrics_frame(run, kind) if k != "step" and k not in exclude]


@dataclass
class DatasetMeta:
    """Class names and palette of a run's dataset (from its manifest when found, else generic)."""

    class_names: list[str]
    palette: list[list[int]]
    source: str
    """The manifest's path, or why the generic fallback is used."""
    generic: bool = False
    """True for the fallback (:func:`generic_meta`)."""

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)


def generic_meta(num_classes: int, why: str) -> DatasetMeta:
    """``num_classes`` classes named "class k" with the VOC palette; ``why`` says why no manifest is used."""
    from workbench.data.manifest import voc_palette

    return DatasetMeta([f"class {k}" for k in range(num_classes)], voc_palette(max(num_classes, 1)), why, True)


def dataset_meta(run_path: str | Path, num_classes_hint: int | None = None) -> DatasetMeta:
    """Class names and palette of the dataset of a run (the package's one lookup: notebooks, reports and the
    dashboard): ``config.yaml`` -> ``data.root`` (a relative root resolved against the project root,
    :mod:`workbench.paths`) -> ``manifest.json`` (:func:`workbench.data.manifest.load_manifest`). A palette shorter
    than the class list is completed with VOC colours.

    Falls back to ``num_classes_hint`` (or 21) classes named "class k" with the VOC palette when the config or the
    manifest cannot be read (e.g. the run was copied from another machine).
    """
    from workbench.data.manifest import DataError, load_manifest, voc_palette
    from workbench.paths import project_path

    n = num_classes_hint or 21
    cfg_path = RunDir(run_path).config
    try:
        root = (yaml.safe_load(cfg_path.read_text()) or {}).get("data", {}).get("root")
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError) as e:
        return generic_meta(n, f"no readable config.yaml ({type(e).__name__})")
    if not root or not isinstance(root, str):
        return generic_meta(n, "config.yaml has no data.root")
    try:
        m = load_manifest(project_path(root))
    except DataError as e:  # the dataset is elsewhere, or its manifest is damaged
        return generic_meta(n, f"manifest not readable: {e}")
    names, palette = list(m.class_names), [list(c) for c in m.palette]
    if len(palette) < len(names):
        palette += voc_palette(len(names))[len(palette):]
    return DatasetMeta(names, palette, str(m.root / "manifest.json"))


def _data_root(run: Run) -> str | None:
    """The run's ``data.root``, a relative one resolved against the project root (:mod:`workbench.paths`), so that
    a notebook started in ``notebooks/`` finds the dataset the run trained on."""
    from workbench.paths import project_path

    root = lookup(run, "data.root")
    return project_path(root) if isinstance(root, str) else root


def dataset_info(run: Run) -> tuple[list[str], list[list[int]]]:
    """(class names, palette) of the run's dataset (:func:`dataset_meta`). When the dataset is not on this machine:
    a warning, ``class k`` names and the VOC palette, with the class count taken from the run's final IoU list."""
    meta = dataset_meta(run.path, len(lookup(run, "final.iou") or []) or None)
    if meta.generic:
        warnings.warn(f"run {run.name}: dataset manifest unavailable ({meta.source}); using generic class names",
                      stacklevel=2)
    return meta.class_names, meta.palette


def records_by_run(runs: Sequence[Run], kind: str = "eval") -> dict[str, list[dict[str, Any]]]:
    """``{run name: metrics records of kind}`` as :func:`workbench.viz.figures.training_curves` expects."""
    return {r.name: r.metrics(kind) for r in runs}


def val_samples(run: Run, n: int = 6) -> tuple[Tensor, Tensor]:
    """The first ``n`` validation samples of the run's dataset: uint8 images [n,3,H,W], long labels [n,H,W]
    (the images must share one size, as in the embedded dataset)."""
    from workbench.data.dataset import EvalDataset

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    val = EvalDataset(_data_root(run), lookup(run, "data.val_split", "val"))
    items = [val[i] for i in range(min(n, len(val)))]
    return torch.stack([i for i, _ in items]), torch.stack([m for _, m in items])
