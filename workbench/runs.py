"""Run directories as tables and series for notebooks and reports (read side), plus launching a run from a
notebook's parameters (write side goes through the engine).

A run directory (layout: :mod:`workbench.engine.rundir`) is read into a :class:`Run`: its resolved config (nested
dict), its ``summary.json`` (None while unfinished) and lazy access to ``metrics.jsonl`` and captured artifacts.
Values are looked up with dotted keys by :func:`lookup`: first in the summary (``best.miou``, ``final.fg_iou``,
``steps``, ``timing.seconds_total``), then in the config (``method.name``, ``data.split``, ``train.seed``).

Tables are :class:`Table` objects (plain rows, no pandas) that render as HTML in notebooks and as Markdown in
text reports. Undefined numbers (None or NaN) show as ``-``.
"""
from __future__ import annotations

import fnmatch
import html
import json
import math
import subprocess
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from torch import Tensor

from workbench.engine.rundir import RunDir
from workbench.ops import IGNORE
from workbench.ops.semi import class_quality
from workbench.runfiles import discover_runs

# Config keys that name or place a run, or change speed but not results: never "varied" in an ablation table.
INFRA_KEYS = ("name", "out_dir", "train.seed", "train.progress", "train.device", "train.threads",
              "train.tensorboard", "train.log_every", "train.capture_every", "train.checkpoint_every",
              "data.num_workers", "data.pin_memory", "data.root", "eval.batch_size", "model.channels_last")

RUN_COLUMNS = ("method.name", "data.split", "train.seed", "steps", "best.miou", "best.step", "final.miou",
               "final.fg_iou", "final.fg_class_acc", "timing.seconds_total")


# ----------------------------------------------------------------------------------------------------- tables


class MeanStd(NamedTuple):
    """Mean and sample standard deviation (None for a single value) of ``n`` numbers."""

    mean: float
    std: float | None
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f}" if self.std is None else f"{self.mean:.3f} ± {self.std:.3f}"


def mean_std(values: Iterable[float | None]) -> MeanStd | None:
    """:class:`MeanStd` of the finite values (None and NaN skipped); None when none is left.

    The std is the sample standard deviation (ddof = 1), the usual "± over seeds" of the papers' tables.
    """
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return None
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None
    return MeanStd(m, sd, len(xs))


def format_cell(v: Any, digits: int = 3) -> str:
    """Text of a table cell: floats with ``digits`` decimals, None/NaN as ``-``, lists joined by commas."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, (list, tuple)) and not isinstance(v, MeanStd):
        return ", ".join(format_cell(x, digits) for x in v)
    return str(v)


@dataclass(repr=False)
class Table:
    """A small table: ``columns`` names and ``rows`` (lists of cell values, one per column).

    Displays as an HTML table in notebooks (``_repr_html_``); ``to_markdown()`` for text reports.
    """

    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    title: str | None = None

    def __post_init__(self) -> None:
        for i, r in enumerate(self.rows):
            if len(r) != len(self.columns):
                raise ValueError(f"rows[{i}] has {len(r)} cells for {len(self.columns)} columns")

    def __len__(self) -> int:
        return len(self.rows)

    def column(self, name: str) -> list[Any]:
        """The cells of column ``name`` (KeyError naming the known columns otherwise)."""
        if name not in self.columns:
            raise KeyError(f"no column {name!r}; columns are {self.columns}")
        j = self.columns.index(name)
        return [r[j] for r in self.rows]

    def records(self) -> list[dict[str, Any]]:
        """Rows as dicts keyed by column name."""
        return [dict(zip(self.columns, r)) for r in self.rows]

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown (title as a bold line above)."""
        esc = lambda s: s.replace("|", "\\|")
        lines = [f"**{self.title}**", ""] if self.title else []
        lines.append("| " + " | ".join(esc(c) for c in self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(esc(format_cell(v)) for v in r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(format_cell(v))}</td>" for v in r) + "</tr>"
                       for r in self.rows)
        cap = f"<caption>{html.escape(self.title)}</caption>" if self.title else ""
        return f'<table class="workbench-table">{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def __repr__(self) -> str:
        return self.to_markdown()


# ------------------------------------------------------------------------------------------------------ runs


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


class MixedDataError(ValueError):
    """Runs trained on different data were put in one table (see :func:`check_same_data`)."""


def data_fingerprint(run: Run) -> str | None:
    """The fingerprint of the data the run trained on (summary.json ``dataset.fingerprint``; None for runs made
    before runs recorded it, or unfinished ones without a summary)."""
    v = lookup(run, "dataset.fingerprint")
    return v if isinstance(v, str) else None


def check_same_data(runs: Sequence[Run], mixed_data: bool = False) -> bool:
    """Whether ``runs`` trained on different data (by :func:`data_fingerprint`; runs without one are not
    compared). Different data raises :class:`MixedDataError` naming the groups, unless ``mixed_data``: then it
    returns True and the caller says so (the tables add a ``data`` column)."""
    groups: dict[str, list[str]] = {}
    for r in runs:
        fp = data_fingerprint(r)
        if fp is not None:
            groups.setdefault(fp, []).append(r.name)
    if len(groups) <= 1:
        return False
    if not mixed_data:
        detail = "; ".join(f"{fp[:19]}...: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                           for fp, names in groups.items())
        raise MixedDataError(f"these runs trained on {len(groups)} different datasets ({detail}); their numbers are "
                             "not comparable: pass mixed_data=True to tabulate them anyway with a data column")
    return True


def _data_column(runs: Sequence[Run], columns: list[str], rows: list[list[Any]], mixed: bool
                 ) -> tuple[list[str], list[list[Any]]]:
    if not mixed:
        return columns, rows
    return [*columns, "data"], [[*row, (data_fingerprint(r) or "unknown")[:15]] for r, row in zip(runs, rows)]


def runs_table(runs: Sequence[Run], columns: Sequence[str] = RUN_COLUMNS, title: str | None = "runs",
               mixed_data: bool = False) -> Table:
    """One row per run: its name then :func:`lookup` of each of ``columns``. Runs trained on different data
    raise :class:`MixedDataError` unless ``mixed_data`` (then a ``data`` column shows each run's fingerprint)."""
    mixed = check_same_data(runs, mixed_data)
    cols, rows = _data_column(runs, ["run", *columns], [[r.name, *(lookup(r, c) for c in columns)] for r in runs],
                              mixed)
    return Table(cols, rows, title)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> ``{"a.b": value}`` (lists stay values)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def varied_keys(runs: Sequence[Run], exclude: Sequence[str] = INFRA_KEYS) -> list[str]:
    """Config keys whose values differ between ``runs`` (a key missing from some runs counts as differing),
    except ``exclude``; sorted, with ``method.name`` first when it varies."""
    flats = [flatten(r.config) for r in runs]
    keys = set().union(*flats) if flats else set()
    out = sorted(k for k in keys if k not in exclude and len({json.dumps(f.get(k)) for f in flats}) > 1)
    return sorted(out, key=lambda k: k != "method.name")


def ablation_table(runs: Sequence[Run], by: Sequence[str] | None = None,
                   metrics: Sequence[str] = ("best.miou", "final.miou", "final.fg_iou"),
                   title: str | None = "ablation (mean ± std over seeds)", mixed_data: bool = False) -> Table:
    """Runs grouped by the config values of ``by`` (default: :func:`varied_keys`), one row per group: the values,
    the number of runs, their seeds, and :class:`MeanStd` of each metric over the group (None when no run of
    the group has it). Groups are ordered by first appearance in ``runs``. Runs trained on different data raise
    :class:`MixedDataError` unless ``mixed_data``: then the data fingerprint is one of the grouping keys."""
    by = list(varied_keys(runs) if by is None else by)
    if check_same_data(runs, mixed_data):
        by.append("dataset.fingerprint")
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(json.dumps([lookup(r, k) for k in by]), []).append(r)
    rows = []
    for members in groups.values():
        first = members[0]
        rows.append([*(lookup(first, k) for k in by), len(members), sorted(lookup(m, "train.seed") for m in members),
                     *(mean_std(lookup(m, k) for m in members) for k in metrics)])
    return Table([*by, "runs", "seeds", *metrics], rows, title)


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


def per_class_table(runs: Sequence[Run], which: str = "final", class_names: Sequence[str] | None = None,
                    title: str | None = "per-class IoU", mixed_data: bool = False) -> Table:
    """One row per run: the per-class IoU list of its ``which`` ("final") evaluation in summary.json. Runs trained
    on different data raise :class:`MixedDataError` unless ``mixed_data`` (then a ``data`` column is added)."""
    mixed = check_same_data(runs, mixed_data)
    lists = [lookup(r, f"{which}.iou") or [] for r in runs]
    k = max((len(v) for v in lists), default=0)
    names = list(class_names) if class_names is not None else (dataset_info(runs[0])[0] if runs else [])
    if len(names) < k:
        names += [f"class {i}" for i in range(len(names), k)]
    cols, rows = _data_column(runs, ["run", *names[:k]], [[r.name, *(v + [None] * (k - len(v)))]
                                                          for r, v in zip(runs, lists)], mixed)
    return Table(cols, rows, title)


def records_by_run(runs: Sequence[Run], kind: str = "eval") -> dict[str, list[dict[str, Any]]]:
    """``{run name: metrics records of kind}`` as :func:`workbench.viz.figures.training_curves` expects."""
    return {r.name: r.metrics(kind) for r in runs}


# --------------------------------------------------------------------------------- pseudo-label quality


PL_KEYS = ("pl_acc", "pl_miou", "mask_ratio", "mining_ratio", "effective_ratio")


def pseudo_label_series(run: Run, keys: Sequence[str] = PL_KEYS) -> dict[str, list[Any]]:
    """The run's pseudo-label diagnostics over training (train records), as :func:`metrics_frame` columns.

    ValueError when the run logged none of ``keys`` (e.g. a supervised-only run).
    """
    frame = metrics_frame(run, "train", keys)
    if not any(v is not None for k in keys for v in frame[k]):
        raise ValueError(f"run {run.name} ({lookup(run, 'method.name')}) logged no pseudo-label diagnostics "
                         f"{list(keys)}; pick a semi-supervised run")
    return frame


def capture_steps(run: Run) -> list[int]:
    """Steps with captured artifacts (complete captures only), ascending."""
    return sorted(e["step"] for e in run.dir.artifact_index())


def load_capture(run: Run, step: int | None = None) -> tuple[int, dict[str, Tensor]]:
    """(step, tensors) of the capture at ``step`` (None = the last one); ValueError when there is none."""
    steps = capture_steps(run)
    if not steps:
        raise ValueError(f"run {run.name} has no captured artifacts (set train.capture_every > 0)")
    if step is None:
        step = steps[-1]
    if step not in steps:
        raise ValueError(f"step: run {run.name} has captures at steps {steps}, not {step}")
    return step, run.dir.load_artifacts(step)


def capture_quality(run: Run, capture: dict[str, Tensor], num_classes: int) -> dict[str, Tensor]:
    """:func:`class_quality` of one weak-to-strong capture (keys pseudo, confident, y_u, ignore)."""
    missing = [k for k in ("pseudo", "confident", "y_u") if k not in capture]
    if missing:
        raise ValueError(f"run {run.name}: capture lacks {missing} (a semi-supervised run with unlabeled ground "
                         "truth captures them)")
    valid = capture["ignore"] != IGNORE if "ignore" in capture else None
    return class_quality(capture["pseudo"], capture["confident"], capture["y_u"], num_classes, valid)


def class_quality_over_steps(run: Run, num_classes: int) -> list[tuple[int, dict[str, Tensor]]]:
    """``[(step, class_quality)]`` for every capture of the run."""
    return [(s, capture_quality(run, run.dir.load_artifacts(s), num_classes)) for s in capture_steps(run)]


def class_quality_table(quality: dict[str, Tensor], class_names: Sequence[str], title: str | None = None) -> Table:
    """One row per class of a :func:`class_quality` result."""
    keys = ["gt_pixels", "iou", "precision", "mask_ratio", "mining_ratio"]
    rows = [[name, int(quality["gt_pixels"][i]), *(float(quality[k][i]) for k in keys[1:])]
            for i, name in enumerate(class_names)]
    return Table(["class", *keys], rows, title)


# ------------------------------------------------------------------------------------- images of a run


def val_samples(run: Run, n: int = 6) -> tuple[Tensor, Tensor]:
    """The first ``n`` validation samples of the run's dataset: uint8 images [n,3,H,W], long labels [n,H,W]
    (the images must share one size, as in the embedded dataset)."""
    from workbench.data.dataset import EvalDataset

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    val = EvalDataset(_data_root(run), lookup(run, "data.val_split", "val"))
    items = [val[i] for i in range(min(n, len(val)))]
    return torch.stack([i for i, _ in items]), torch.stack([m for _, m in items])


# ----------------------------------------------------------------------------------- launching a run


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


__all__ = ["Run", "Table", "MeanStd", "mean_std", "lookup", "load_run", "load_runs", "metrics_frame", "runs_table",
           "logged_keys", "varied_keys", "ablation_table", "per_class_table", "records_by_run", "dataset_info",
           "DatasetMeta", "dataset_meta", "generic_meta", "discover_runs",
           "pseudo_label_series", "class_quality", "capture_steps", "load_capture", "capture_quality",
           "class_quality_over_steps", "class_quality_table", "val_samples", "train_overrides", "training_command",
           "train_run", "flatten", "format_cell"]
