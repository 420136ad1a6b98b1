"""Tables of numbers (plain rows, no pandas) that render as HTML in notebooks and as Markdown in text reports;
undefined numbers (None or NaN) show as ``-``; mean +- std cells over seeds."""
from __future__ import annotations

import html
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple


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
