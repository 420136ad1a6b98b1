"""Reading run directories while they are written, without torch: where the runs are (:func:`discover_runs`) and
what was appended to their JSON-lines files (:class:`JsonlTail`). The one implementation of each, used by the run
analyses (:mod:`workbench.runs`), the dashboard and the live progress of ``workbench report``
(:mod:`workbench.progress`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["discover_runs", "JsonlTail"]


def discover_runs(runs_dir: str | Path, max_depth: int = 3) -> list[str]:
    """Run directories under ``runs_dir`` (the package's one run discovery: :func:`load_runs` and the dashboard):
    relative POSIX paths of folders holding ``metrics.jsonl`` or ``config.yaml`` (searched ``max_depth`` levels
    deep, hidden folders skipped, a run's own subfolders not searched), sorted; "." when ``runs_dir`` is itself a
    run; [] when it does not exist. Only real directories under the root count: symbolic links (which could lead
    the dashboard out of its root) are skipped."""
    root = Path(runs_dir)
    found: list[str] = []
    real_root = root.resolve()

    def visit(d: Path, depth: int) -> None:
        if (d / "metrics.jsonl").is_file() or (d / "config.yaml").is_file():
            found.append(d.relative_to(root).as_posix())
            return
        if depth >= max_depth:
            return
        try:
            children = sorted(p for p in d.iterdir() if p.is_dir() and not p.is_symlink()
                              and not p.name.startswith(".") and p.resolve().is_relative_to(real_root))
        except OSError:
            return
        for child in children:
            visit(child, depth + 1)

    if root.is_dir():
        visit(root, 0)
    return sorted(found)


class JsonlTail:
    """Incremental reader of an append-only JSON-lines file (``metrics.jsonl``, ``artifacts/index.jsonl``).

    ``poll()`` parses only what was appended since the previous call. A last line without its newline (a writer
    mid-write) is left for a later poll; a complete line that is not a JSON object is skipped and counted in
    ``bad_lines``; a file that shrank or was replaced (other inode: an atomic rewrite on resume) is read again.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        self.bad_lines = 0
        self._offset = 0
        self._ident: tuple[int, int] | None = None

    def _reset(self) -> None:
        self.records, self.bad_lines, self._offset, self._ident = [], 0, 0, None

    def poll(self) -> bool:
        """Read what was appended; True when ``records`` changed (new records, or the file was reset/removed)."""
        try:
            st = self.path.stat()
        except (FileNotFoundError, NotADirectoryError):
            changed = bool(self.records) or self._ident is not None
            self._reset()
            return changed
        ident = (st.st_dev, st.st_ino)
        reset = self._ident is not None and (ident != self._ident or st.st_size < self._offset)
        if reset:
            self._reset()
        self._ident = ident
        if st.st_size == self._offset:
            return reset
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            chunk = f.read(st.st_size - self._offset)
        end = chunk.rfind(b"\n")
        if end < 0:
            return reset
        for line in chunk[:end].split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                rec = None
            if isinstance(rec, dict):
                self.records.append(rec)
            else:
                self.bad_lines += 1
        self._offset += end + 1
        return True
