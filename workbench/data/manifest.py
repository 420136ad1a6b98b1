"""A dataset root's ``manifest.json`` (name, classes, palette, split lists): the package's one reader of it.

Light on purpose (json and pathlib only, no torch or torchvision), so the dashboard's first page, the run analyses
and the data pipeline read class names and palettes the same way.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.ops import IGNORE

__all__ = ["MANIFEST_FORMAT", "DataError", "Manifest", "load_manifest", "voc_palette"]

MANIFEST_FORMAT = "workbench-dataset/1"


class DataError(RuntimeError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""


@dataclass
class Manifest:
    """The parsed manifest.json of a dataset root."""

    root: Path
    name: str
    num_classes: int
    class_names: list[str]
    palette: list[list[int]]
    ignore_index: int
    splits: dict[str, str]
    raw: dict[str, Any]

    def split_path(self, split: str) -> Path:
        """Path of split list ``split``; DataError listing the available splits otherwise."""
        if split not in self.splits:
            raise DataError(f"{self.root / 'manifest.json'}: no split {split!r}; available: {sorted(self.splits)}")
        return self.root / self.splits[split]


def load_manifest(root: str | Path) -> Manifest:
    """Read and check ``root/manifest.json``."""
    root = Path(root)
    path = root / "manifest.json"
    if not path.is_file():
        raise DataError(f"{path} not found: generate the data (workbench data synth --out {root}) or prepare it "
                        "(workbench data prepare NAME --root DIR)")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    for key in ("num_classes", "class_names", "palette", "splits"):
        if key not in raw:
            raise DataError(f"{path}: missing key {key!r}")
    names, palette = raw["class_names"], raw["palette"]
    if not isinstance(names, list) or len(names) != raw["num_classes"] or not isinstance(palette, list):
        raise DataError(f"{path}: class_names must list num_classes = {raw['num_classes']!r} names and palette "
                        "must be a list of colours")
    if raw.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{path}: format {raw.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return Manifest(root, raw.get("name", root.name), int(raw["num_classes"]), [str(n) for n in names],
                    [list(c) for c in raw["palette"]], int(raw.get("ignore_index", IGNORE)), dict(raw["splits"]), raw)


def voc_palette(n: int = 256) -> list[list[int]]:
    """The Pascal VOC colour map, ``n`` entries: class i's bits 0/1/2 (then 3/4/5, ...) fill R/G/B from the top bit
    down (the palette of VOC's label PNGs)."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append([r, g, b])
    return out
