"""Live progress of training runs, read from their run directories while something else trains them.

``workbench report`` (and so ``make demo``) executes notebooks in a Jupyter kernel, whose output reaches the terminal
only when the notebook ends. :class:`RunWatcher` follows the run directories instead: a background thread polls
``<runs>/**/metrics.jsonl`` and prints, per run that is written during the watch, one line when it starts, a line
at most every ``every`` seconds while it trains, a line after every evaluation and one when it finishes::

    [progress] quickstart-unimatch-s0  step  600/1500 (40%)  loss 0.412  val mIoU 0.436 @500  3.1 it/s  ETA 4m50s

The steps per second and the ETA come from the watcher's own clock (the metrics carry no time stamps), measured
over the steps it saw advance. It reads only whole lines, so a half-written line is picked up on the next poll.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from workbench.runfiles import JsonlTail, discover_runs


def format_seconds(seconds: float) -> str:
    """``75`` -> ``"1m15s"``, ``3700`` -> ``"1h01m"``, ``42`` -> ``"42s"``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@dataclass
class _Run:
    """What the watcher knows of one run directory."""

    path: Path
    total: int | None
    eval_every: int | None = None
    tail: JsonlTail | None = None
    seen: int = 0  # records of the tail already processed
    step: int = 0
    loss: float | None = None
    miou: float | None = None
    miou_step: int | None = None
    best: float | None = None
    samples: list[tuple[float, int]] = field(default_factory=list)  # (watcher time, step) when the step advanced
    last_print: float = 0.0
    printed_step: int = 0
    done: bool = False


def _schedule(run: Path) -> tuple[int | None, int | None]:
    """(total optimiser steps, evaluation cadence) of a run: ``train.iters`` of config.yaml (else summary.json's
    ``total_steps``) and ``train.eval_every`` (None when unknown or 0)."""
    total = every = None
    try:
        train = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("train") or {}
        total = train.get("iters") if isinstance(train.get("iters"), int) and train["iters"] > 0 else None
        every = train.get("eval_every") if isinstance(train.get("eval_every"), int) and train["eval_every"] > 0 \
            else None
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    if total is None:
        try:
            total = int(json.loads((run / "summary.json").read_text())["total_steps"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return total, every


class RunWatcher:
    """Print progress lines of the runs under ``root`` written after ``since`` (a ``time.time()``), from a
    background thread polling every ``interval`` seconds; a training line per run at most every ``every`` seconds
    (evaluations and the end always print). Use as a context manager; ``poll()`` runs one pass (tests).

    ``root`` may not exist yet (it is looked for on every pass); runs nested up to ``depth`` levels below it are
    found. Nothing is printed for runs untouched since ``since`` (finished runs a report skips).
    """

    def __init__(self, root: str | Path, since: float | None = None, stream: IO[str] | None = None,
                 interval: float = 2.0, every: float = 30.0, depth: int = 3, prefix: str = "[progress]") -> None:
        if interval <= 0 or every < 0:
            raise ValueError(f"interval must be > 0 and every >= 0, got {interval} and {every}")
        self.root = Path(root)
        self.since = time.time() if since is None else since
        self.stream = stream
        self.interval = interval
        self.every = every
        self.depth = depth
        self.prefix = prefix
        self.runs: dict[Path, _Run] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _emit(self, text: str) -> None:
        stream = self.stream or sys.stderr
        print(f"{self.prefix} {text}", file=stream, flush=True)

    def _metrics_files(self) -> list[Path]:
        """The metrics.jsonl of every run under the root (:func:`workbench.runfiles.discover_runs`)."""
        found = (self.root / name / "metrics.jsonl" for name in discover_runs(self.root, self.depth))
        return [m for m in found if m.is_file()]

    def line(self, run: _Run, now: float) -> str:
        """The progress line of ``run`` at watcher time ``now``."""
        name = run.path.relative_to(self.root).as_posix() if run.path != self.root else run.path.name
        parts = [name]
        if run.total:
            width = len(str(run.total))
            parts.append(f"step {run.step:>{width}d}/{run.total} ({100 * run.step / run.total:.0f}%)")
        else:
            parts.append(f"step {run.step}")
        if run.loss is not None:
            parts.append(f"loss {run.loss:.3f}")
        if run.miou is not None:
            parts.append(f"val mIoU {run.miou:.3f} @{run.miou_step}")
        rate = self.rate(run)
        if rate:
            parts.append(f"{rate:.1f} it/s")
            if run.total and not run.done:
                parts.append(f"ETA {format_seconds((run.total - run.step) / rate)}")
        return "  ".join(parts)

    @staticmethod
    def rate(run: _Run) -> float | None:
        """Steps per second over the last (up to 6) advances the watcher saw (None before two)."""
        if len(run.samples) < 2:
            return None
        (t0, s0), (t1, s1) = run.samples[0], run.samples[-1]
        return (s1 - s0) / (t1 - t0) if t1 > t0 and s1 > s0 else None

    def poll(self, now: float | None = None) -> None:
        """Read what the runs appended since the last pass and print the lines that are due."""
        now = time.monotonic() if now is None else now
        for metrics in self._metrics_files():
            run_dir = metrics.parent
            run = self.runs.get(run_dir)
            if run is None:
                try:
                    if metrics.stat().st_mtime < self.since - 1:
                        continue
                except OSError:
                    continue
                run = self.runs[run_dir] = _Run(run_dir, *_schedule(run_dir))
                self._emit(f"{run_dir.relative_to(self.root).as_posix()}: training"
                           + (f" ({run.total} steps)" if run.total else ""))
            if run.done:
                continue
            if run.tail is None:
                run.tail = JsonlTail(metrics)
            run.tail.poll()
            if len(run.tail.records) < run.seen:  # the file was replaced (a resumed run rewrites it): read it again
                run.seen = 0
            fresh, run.seen = run.tail.records[run.seen:], len(run.tail.records)
            evaluated = False
            for rec in fresh:
                if rec.get("kind") == "train" and isinstance(rec.get("step"), int):
                    run.step = rec["step"]
                    run.loss = rec.get("loss") if isinstance(rec.get("loss"), (int, float)) else run.loss
                elif rec.get("kind") == "eval" and isinstance(rec.get("step"), int):
                    run.step = max(run.step, rec["step"])
                    if isinstance(rec.get("miou"), (int, float)):
                        run.miou, run.miou_step = rec["miou"], rec["step"]
                        run.best = rec["miou"] if run.best is None else max(run.best, rec["miou"])
                    evaluated = True
            if run.step > (run.samples[-1][1] if run.samples else 0):
                run.samples = (run.samples + [(now, run.step)])[-6:]  # the recent rate: the ETA follows load
            # a training line at a step that is evaluated waits for that evaluation's line (one line, not two)
            eval_next = not evaluated and run.step != run.miou_step and (
                run.step == run.total or bool(run.eval_every and run.step % run.eval_every == 0))
            if run.total is not None and run.step >= run.total and evaluated:
                run.done = True
                best = f", best val mIoU {run.best:.3f}" if run.best is not None else ""
                self._emit(self.line(run, now) + f"  done{best}")
                run.last_print = now
            elif evaluated or (now - run.last_print >= self.every and run.step != run.printed_step and not eval_next):
                self._emit(self.line(run, now))
                run.last_print = now
            run.printed_step = run.step if run.last_print == now else run.printed_step

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as e:  # a progress display must never take the work down with it
                self._emit(f"(progress display stopped: {type(e).__name__}: {e})")
                return

    def __enter__(self) -> RunWatcher:
        self._thread = threading.Thread(target=self._loop, name="run-watcher", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.poll()  # the last lines written before the end
        except Exception:
            pass
