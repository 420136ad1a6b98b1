"""Pseudo-label series of a run's metrics and per-class pseudo-label quality of its captures
(:func:`workbench.ops.semi.class_quality`)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from workbench.ops import IGNORE
from workbench.ops.semi import class_quality
from workbench.runs.record import Run, lookup, metrics_frame
from workbench.runs.table import Table

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
