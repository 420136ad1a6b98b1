"""The run directory: the one place that knows its layout (README, "Run directory").

::

    runs/<name>/config.yaml        resolved config
               metrics.jsonl      one JSON object a line: {"kind": "train"|"eval", "step": ..., ...}
               checkpoints/       latest.pt, latest.prev.pt, best.pt (atomic: temp file + fsync + rename), each
                                  with its X.pt.sha256 (see workbench.engine.checkpoint)
               .lock              held (fcntl.flock) by the one trainer writing the run: pid and host
               artifacts/         step_<000123>.pt (dict of CPU tensors) + index.jsonl (one line per capture)
               summary.json       final metrics, timings, environment, dataset (its fingerprint)

Artifact format (read by notebooks and the dashboard): ``artifacts/step_<N>.pt`` is ``torch.save`` of a flat
``dict[str, Tensor]`` (load with ``torch.load(path, weights_only=True)``). Images are uint8 [B,3,H,W] (denormalised),
labels/pseudo-labels uint8 [B,H,W] (255 = ignore), confidences float16 [B,H,W], masks bool, feature maps float16.
Every method's capture holds ``features`` float16 [n,D,h,w] (pixel features for the dashboard's t-SNE: the evaluated
network's ASPP map of the first n <= 4 weak unlabeled images, or labeled images for supervised-only training; at
most 32 x 32 cells) and ``feature_labels`` uint8 [n,h,w] (their ground truth, else the network's prediction, 255 =
ignore); see ``workbench.methods.base.Method.feature_artifacts``. RankMatch keeps its own ``features`` (the weak
view's ASPP map of the whole unlabeled batch, from the training pass) without ``feature_labels``.
``artifacts/index.jsonl`` has one line per capture: ``{"step", "epoch", "file", "keys": {name: [shape, dtype]}}``,
appended only after the .pt file is complete, so a reader never sees a half-written capture.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


def write_temp(write: Any, path: Path) -> Path:
    """Call ``write(file)`` on a new temp file beside ``path`` (a dot-file ending in ``.tmp``), flush and fsync it;
    returns the temp file's path (the caller renames it into place). The temp file is removed on failure, and a
    full disk or another OS error names ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and not e.filename:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise
    return Path(tmp)


def fsync_dir(path: Path) -> None:
    """fsync a directory (makes renames inside it durable); ignored where the OS does not allow it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync, then rename over ``path``.

    The previous file survives any failure (exception, full disk, kill): the temp file is removed or left as a
    dot-file ending in ``.tmp`` that readers ignore (and :meth:`RunDir.clean_temps` removes).
    """
    tmp = write_temp(write, path)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    _atomic(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write text (UTF-8)."""
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: Path) -> None:
    """Atomic ``torch.save``: the old file at ``path`` survives any failure."""
    _atomic(path, lambda f: torch.save(obj, f))


def read_jsonl(path: Path, problems: list[str] | None = None) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; [] when the file is missing.

    A torn last line (a crash mid-write) is skipped silently. Any other unreadable line is skipped too and named
    ``<file>:<line>`` in ``problems`` when a list is given, else in a warning on stderr."""
    if not path.is_file():
        return []
    out = []
    lines = path.read_text(errors="replace").split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i >= len(lines) - 2:  # torn tail from a crash mid-write
                continue
            msg = f"{path}:{i + 1}: unreadable line skipped ({e.msg})"
            if problems is not None:
                problems.append(msg)
            else:
                print(f"workbench: warning: {msg}", file=sys.stderr)
            continue
        if isinstance(rec, dict):
            out.append(rec)
        else:
            msg = f"{path}:{i + 1}: not a JSON object, skipped"
            if problems is not None:
                problems.append(msg)
            else:
                print(f"workbench: warning: {msg}", file=sys.stderr)
    return out


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock; the message names its pid and host."""


class RunLock:
    """An exclusive OS lock (``fcntl.flock``) on ``<run>/.lock``, held while a trainer writes the run.

    The OS releases it when the holder exits or crashes, so a stale lock cannot block a resume. The file records
    the holder's pid and host (informational; it is the only run-directory file written in place, since renaming
    a new file over it would break the lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock without waiting; RunLockedError naming the holder when another process has it."""
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise RunLockedError(f"run directory {self.path.parent} is in use by another trainer ({holder}); wait "
                                 "for it to finish, or pick another train name") from None
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, info, 0)
        self.fd = fd

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


class RunDir:
    """Paths and writers of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml", doc="config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl", doc="metrics.jsonl")
    summary = property(lambda self: self.path / "summary.json", doc="summary.json")
    checkpoints = property(lambda self: self.path / "checkpoints", doc="checkpoints/")
    artifacts = property(lambda self: self.path / "artifacts", doc="artifacts/")
    latest = property(lambda self: self.path / "checkpoints" / "latest.pt", doc="checkpoints/latest.pt")
    lockfile = property(lambda self: self.path / ".lock", doc=".lock (see :class:`RunLock`)")
    best = property(lambda self: self.path / "checkpoints" / "best.pt", doc="checkpoints/best.pt")

    def create(self) -> None:
        """Make the directory tree."""
        for p in (self.path, self.checkpoints, self.artifacts):
            p.mkdir(parents=True, exist_ok=True)

    # ---- metrics
    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line (flushed and fsynced: a crash loses at most the line being written)."""
        line = json.dumps(record, default=_json_default) + "\n"
        with open(self.metrics, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self, kind: str | None = None) -> list[dict[str, Any]]:
        """All metric records (optionally only ``kind``), ignoring a torn last line."""
        recs = read_jsonl(self.metrics)
        return [r for r in recs if kind is None or r.get("kind") == kind]

    def truncate_metrics(self, last_step: int) -> list[str]:
        """Keep only records with step <= last_step (resume or restart: later ones will be logged again), atomically;
        unreadable lines are dropped and returned as ``<file>:<line>`` messages."""
        problems: list[str] = []
        recs = read_jsonl(self.metrics, problems)
        keep = [r for r in recs if _step(r) <= last_step]
        if self.metrics.is_file():
            atomic_write_text(self.metrics, "".join(json.dumps(r, default=_json_default) + "\n" for r in keep))
        return problems

    def clean_temps(self) -> list[Path]:
        """Remove leftover temp files (``.*.tmp``) of interrupted writes anywhere in the run directory (only while
        holding the run's lock: no other writer exists then); returns them."""
        out = []
        for d in (self.path, self.checkpoints, self.artifacts):
            if d.is_dir():
                for p in d.glob(".*.tmp"):
                    p.unlink(missing_ok=True)
                    out.append(p)
        return out

    # ---- artifacts
    def save_artifacts(self, step: int, epoch: int, tensors: dict[str, torch.Tensor]) -> Path:
        """Write ``artifacts/step_<N>.pt`` atomically, then append its line to ``artifacts/index.jsonl``."""
        path = self.artifacts / f"step_{step:07d}.pt"
        atomic_torch_save(tensors, path)
        entry = {"step": step, "epoch": epoch, "file": path.name,
                 "keys": {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in tensors.items()}}
        with open(self.artifacts / "index.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return path

    def artifact_index(self) -> list[dict[str, Any]]:
        """Index entries of complete captures (torn last line ignored)."""
        return read_jsonl(self.artifacts / "index.jsonl")

    def truncate_artifacts(self, last_step: int) -> None:
        """Resume: drop captures after ``last_step`` (they will be captured again) and stray temp files."""
        entries = [e for e in read_jsonl(self.artifacts / "index.jsonl", []) if _step(e) <= last_step]
        keep = {e["file"] for e in entries}
        if self.artifacts.is_dir():
            for p in self.artifacts.iterdir():
                if (p.suffix == ".pt" and p.name not in keep) or p.name.endswith(".tmp"):
                    p.unlink()
            atomic_write_text(self.artifacts / "index.jsonl", "".join(json.dumps(e) + "\n" for e in entries))

    def load_artifacts(self, step: int) -> dict[str, torch.Tensor]:
        """The tensors captured at ``step``."""
        return torch.load(self.artifacts / f"step_{step:07d}.pt", weights_only=True, map_location="cpu")

    def iter_checkpoint_temps(self) -> Iterator[Path]:
        """Leftover temp files of interrupted checkpoint writes."""
        if self.checkpoints.is_dir():
            yield from self.checkpoints.glob(".*.tmp")

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Atomically write summary.json."""
        atomic_write_text(self.summary, json.dumps(summary, indent=2, default=_json_default) + "\n")


def _step(rec: dict[str, Any]) -> int:
    s = rec.get("step", -1)
    return s if isinstance(s, int) else -1


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
