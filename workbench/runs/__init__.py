"""Run directories as tables and series for notebooks and reports (read side), plus launching a run from a
notebook's parameters (write side goes through the engine). One module per concern, everything re-exported here:

- :mod:`~workbench.runs.table`: :class:`Table` (HTML in notebooks, Markdown in reports), mean +- std cells;
- :mod:`~workbench.runs.record`: :class:`Run`, :func:`load_run` / :func:`load_runs` (through the one run discovery,
  :func:`workbench.runfiles.discover_runs`), dotted-key :func:`lookup`, metrics, the run's dataset
  (:func:`dataset_meta`);
- :mod:`~workbench.runs.compare`: runs, ablation and per-class tables across runs;
- :mod:`~workbench.runs.captures`: pseudo-label series and per-class pseudo-label quality of captures;
- :mod:`~workbench.runs.launch`: training overrides, the command line and :func:`train_run`.
"""
from __future__ import annotations

from workbench.ops.semi import class_quality
from workbench.runfiles import discover_runs
from workbench.runs.captures import (
    PL_KEYS,
    capture_quality,
    capture_steps,
    class_quality_over_steps,
    class_quality_table,
    load_capture,
    pseudo_label_series,
)
from workbench.runs.compare import (
    INFRA_KEYS,
    RUN_COLUMNS,
    MixedDataError,
    ablation_table,
    check_same_data,
    data_fingerprint,
    flatten,
    per_class_table,
    runs_table,
    varied_keys,
)
from workbench.runs.launch import train_overrides, train_run, training_command
from workbench.runs.record import (
    DatasetMeta,
    Run,
    dataset_info,
    dataset_meta,
    generic_meta,
    load_run,
    load_runs,
    logged_keys,
    lookup,
    metrics_frame,
    records_by_run,
    val_samples,
)
from workbench.runs.table import MeanStd, Table, format_cell, mean_std

__all__ = ["Run", "Table", "MeanStd", "mean_std", "lookup", "load_run", "load_runs", "metrics_frame", "runs_table",
           "logged_keys", "varied_keys", "ablation_table", "per_class_table", "records_by_run", "dataset_info",
           "DatasetMeta", "dataset_meta", "generic_meta", "discover_runs",
           "pseudo_label_series", "class_quality", "capture_steps", "load_capture", "capture_quality",
           "class_quality_over_steps", "class_quality_table", "val_samples", "train_overrides", "training_command",
           "train_run", "flatten", "format_cell", "PL_KEYS", "INFRA_KEYS", "RUN_COLUMNS", "MixedDataError",
           "check_same_data", "data_fingerprint"]
