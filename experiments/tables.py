"""Markdown tables of per-seed results shared by the experiment scripts: one row per group, the mean over seeds of
each metric and the per-seed values of the first."""
from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence


def seed_table(rows: Sequence[dict], group_headers: Sequence[str], group: Callable[[dict], tuple],
               columns: Sequence[tuple[str, str, str]]) -> list[str]:
    """Markdown lines of a table with one row per distinct ``group(row)`` (in first-seen order).

    ``columns`` are ``(header, key, format)``; each cell is the mean of ``row[key]`` over the group's rows (None
    counts as 0). A "per seed" column after the first metric lists its values row by row. Rows carrying different
    ``data`` fingerprints (the runs' summary.json ``dataset.fingerprint``) raise ValueError.
    """
    if not columns:
        raise ValueError("columns must not be empty")
    datasets = {r["data"] for r in rows if r.get("data")}
    if len(datasets) > 1:
        raise ValueError(f"the rows come from {len(datasets)} different datasets ({sorted(d[:19] for d in datasets)}"
                         "): results on different data do not share a table; regenerate or split them")
    heads = [*group_headers, columns[0][0], "per seed", *(c[0] for c in columns[1:])]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for g in dict.fromkeys(group(r) for r in rows):
        rs = [r for r in rows if group(r) == g]
        means = [format(statistics.mean(r[k] or 0.0 for r in rs), f) for _, k, f in columns]
        first, fmt = columns[0][1], columns[0][2]
        per_seed = ", ".join(format(r[first] or 0.0, fmt) for r in rs)
        lines.append("| " + " | ".join([*map(str, g), means[0], per_seed, *means[1:]]) + " |")
    return lines
