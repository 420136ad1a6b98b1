"""The run directory: the one place that knows its layout (DESIGN.md, "Run directory").

::

    runs/<name>/config.yaml        resolved config
               metrics.jsonl      one JSON object a line: {"kind": "train"|"eval", "step": ..., ...}
               checkpoints/       latest.pt, best.pt (atomic: temp file + fsync + rename)
               artifacts/         step_<000123>.pt (dict of CPU tensors) + index.jsonl (one line per capture)
               summary.json       final metrics, timings, environment

Artifact format (read by notebooks and the dashboard): ``artifacts/step_<N>.pt`` is ``torch.save`` of a flat
``dict[str, Tensor]`` (load with ``torch.load(path, weights_only=True)``). Images are uint8 [B,3,H,W] (denormalised),
labels/pseudo-labels uint8 [B,H,W] (255 = ignore), confidences float16 [B,H,W], masks bool, feature maps float16.
``artifacts/index.jsonl`` has one line per capture: ``{"step", "epoch", "file", "keys": {name: [shape, dtype]}}``,
appended only after the .pt file is complete, so a reader never sees a half-written capture.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temp file beside ``path``, fsync, then rename over ``path``.

    The previous file survives any failure (exception, full disk, kill): the temp file is removed or left as a
    dot-file ending in ``.tmp`` that readers ignore.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file, skipping a torn (incomplete) last line; [] when the file is missing."""
    if not path.is_file():
        return []
    out = []
    lines = path.read_text().split("\n")
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i >= len(lines) - 2:  # torn tail from a crash mid-write
                continue
            raise
    return out


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

    def truncate_metrics(self, last_step: int) -> None:
        """Keep only records with step <= last_step (resume: later ones will be logged again), atomically."""
        keep = [r for r in read_jsonl(self.metrics) if r.get("step", -1) <= last_step]
        atomic_write_text(self.metrics, "".join(json.dumps(r, default=_json_default) + "\n" for r in keep))

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
        entries = [e for e in self.artifact_index() if e["step"] <= last_step]
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


def _json_default(o: Any) -> Any:
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
