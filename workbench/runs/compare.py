"""Tables across runs: the runs table, ablations grouped by the varied settings (mean +- std over seeds), per-class
IoU; every one refuses runs trained on different data unless asked (:class:`MixedDataError`)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from workbench.runs.record import Run, dataset_info, lookup
from workbench.runs.table import Table, mean_std

# Config keys that name or place a run, or change speed but not results: never "varied" in an ablation table.
INFRA_KEYS = ("name", "out_dir", "train.seed", "train.progress", "train.device", "train.threads",
              "train.tensorboard", "train.log_every", "train.capture_every", "train.checkpoint_every",
              "data.num_workers", "data.pin_memory", "data.root", "eval.batch_size", "model.channels_last")


RUN_COLUMNS = ("method.name", "data.split", "train.seed", "steps", "best.miou", "best.step", "final.miou",
               "final.fg_iou", "final.fg_class_acc", "timing.seconds_total")


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
