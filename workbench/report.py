"""Batch runs of parametrised notebooks: papermill over a parameter grid, HTML exports and an index page.

``workbench report NOTEBOOK --grid seed=0,1 --grid method=fixmatch,unimatch --param iters=300`` executes the
notebook once per point of the cartesian grid (fixed ``--param`` values added to each) and writes, under
``<out>/<name>/`` (``name`` = the notebook's file name without its ``NN_`` order prefix, e.g. ``quickstart``):

* ``<stem>[__key-value...].ipynb`` — the executed copy (written also when a cell fails: it shows the error);
* ``<stem>[__key-value...].html`` — its HTML export (nbconvert), figures embedded;
* ``index.html`` — a table linking every point with its parameters, status, failing cell and duration;
* ``index.json`` — the same, machine-readable.

Values are YAML (``3`` is an int, ``[a, b]`` a list, ``null`` None); a grid axis splits on commas outside
brackets. Parameter names are checked against the notebook's ``parameters`` cell before anything runs. The
notebooks run in the caller's working directory, so relative paths mean what they mean on the command line.
A failing point does not stop the others; :class:`ReportError` is raised at the end when any failed.
"""
from __future__ import annotations

import html
import itertools
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import yaml

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


class ReportError(RuntimeError):
    """Some grid points of a report failed; ``entries`` holds every point's outcome."""

    def __init__(self, message: str, entries: list[ReportEntry]) -> None:
        super().__init__(message)
        self.entries = entries


@dataclass
class ReportEntry:
    """The outcome of one grid point."""

    parameters: dict[str, Any]
    notebook: str
    """executed copy (file name inside the report directory)"""
    html: str | None
    ok: bool
    seconds: float
    error: str | None = None
    """``In [n], line k: <the failing line>`` then ``ExceptionName: message`` of the failing cell"""
    grid: dict[str, Any] = field(default_factory=dict)
    """the grid values of this point (a subset of ``parameters``)"""


# ------------------------------------------------------------------------------------------------ parsing


def split_values(text: str) -> list[str]:
    """Split on commas outside brackets/braces/quotes: ``"0,[a,b],'x,y'"`` -> ``["0", "[a,b]", "'x,y'"]``."""
    parts, depth, quote, cur = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    parts.append(cur)
    return [p.strip() for p in parts]


def _key_value(item: str, what: str) -> tuple[str, str]:
    if "=" not in item:
        raise ValueError(f"{what} {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key.isidentifier():
        raise ValueError(f"{what} {item!r}: {key!r} is not a notebook parameter name")
    return key, raw


_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml(raw: str, what: str) -> Any:
    """YAML value of ``raw``; exponent floats without a dot (``1e-3``, a string in YAML 1.1) become floats."""
    try:
        v = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"{what}: cannot parse {raw!r}: {e}") from None
    return float(v) if isinstance(v, str) and _EXP_FLOAT.fullmatch(v.strip()) else v


def parse_parameters(items: Sequence[str]) -> dict[str, Any]:
    """``["iters=20", "methods=[a, b]"]`` -> ``{"iters": 20, "methods": ["a", "b"]}`` (values as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, raw = _key_value(item, "parameter")
        if key in out:
            raise ValueError(f"parameter {key!r} given twice")
        out[key] = _yaml(raw, f"parameter {key}")
    return out


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["seed=0,1", "method=a,b"]`` -> ``{"seed": [0, 1], "method": ["a", "b"]}`` (axis order kept)."""
    out: dict[str, list[Any]] = {}
    for item in items:
        key, raw = _key_value(item, "grid axis")
        if key in out:
            raise ValueError(f"grid axis {key!r} given twice")
        texts = split_values(raw)
        if any(t == "" for t in texts):
            raise ValueError(f"grid axis {item!r}: empty value")
        out[key] = [_yaml(t, f"grid axis {key}") for t in texts]
    return out


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of the axes, the last axis varying fastest; ``[{}]`` for an empty grid."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def resolve_notebook(notebook: str | Path) -> Path:
    """A notebook path, or a name in the repository's ``notebooks/`` with or without ``.ipynb`` and its order
    prefix (``00_quickstart``, ``quickstart``). FileNotFoundError listing the available ones otherwise."""
    p = Path(notebook)
    cands = [p, p.with_suffix(".ipynb")] if p.suffix != ".ipynb" else [p]
    for d in (Path("notebooks"), NOTEBOOKS):
        cands += [d / f"{p.stem}.ipynb", *sorted(d.glob(f"[0-9]*_{p.stem}.ipynb"))]
    for c in cands:
        if c.is_file():
            return c
    names = sorted(x.stem for x in NOTEBOOKS.glob("*.ipynb"))
    raise FileNotFoundError(f"notebook {str(notebook)!r} not found; notebooks/ has {names}")


def report_name(path: Path) -> str:
    """Report directory name of a notebook: its stem without the ``NN_`` order prefix."""
    return re.sub(r"^\d+_", "", path.stem)


def point_stem(stem: str, point: dict[str, Any]) -> str:
    """File stem of a grid point: ``stem__key-value__...`` (characters outside [A-Za-z0-9._-] become ``-``)."""
    parts = [stem] + [f"{k}-{json.dumps(v) if not isinstance(v, str) else v}" for k, v in point.items()]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", "__".join(parts)).strip("-")


def notebook_parameters(path: Path) -> dict[str, Any]:
    """The notebook's parameters (papermill's inference from the cell tagged ``parameters``): name -> info.
    ValueError when the notebook has no such cell."""
    import nbformat
    from papermill.inspection import inspect_notebook

    nb = nbformat.read(str(path), as_version=4)
    if not any("parameters" in c.get("metadata", {}).get("tags", []) for c in nb.cells):
        raise ValueError(f"notebook {path} has no cell tagged 'parameters'")
    return inspect_notebook(str(path))


# ---------------------------------------------------------------------------------------------- execution


@contextmanager
def _package_importable() -> Iterator[None]:
    """Kernels inherit the environment: make sure they import this same ``workbench`` (PYTHONPATH += its root)."""
    root = str(Path(__file__).resolve().parents[1])
    old = os.environ.get("PYTHONPATH")
    paths = [p for p in (old or "").split(os.pathsep) if p]
    resolved = [str(Path(p).resolve()) for p in paths]
    if root not in resolved:
        os.environ["PYTHONPATH"] = os.pathsep.join([root, *paths])
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _failure(exc: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        frames = [re.sub(r"\x1b\[[0-9;]*m", "", t) for t in exc.traceback or []]
        cell = next((f for f in frames if f.startswith("Cell In[")), "")
        m = re.search(r"^-+> *(\d+) (.*)$", cell, re.M)  # IPython marks the failing line of the cell "----> n"
        first = next((ln for ln in (exc.source or "").splitlines() if ln.strip()), "")
        where = f"line {m.group(1)}: {m.group(2).strip()[:120]}" if m else first[:120]
        return f"In [{exc.exec_count}], {where}\n{exc.ename}: {exc.evalue}"
    return f"{type(exc).__name__}: {exc}"


def export_html(ipynb: Path, target: Path) -> None:
    """nbconvert's HTML export (lab template, images embedded) of an executed notebook."""
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(str(ipynb), as_version=4))
    target.write_text(body, encoding="utf-8")


def execute_point(src: Path, out_dir: Path, stem: str, parameters: dict[str, Any], html_export: bool = True,
                  kernel_name: str | None = None, timeout: float | None = None) -> ReportEntry:
    """Execute ``src`` with ``parameters`` into ``out_dir/<stem>.ipynb`` (and ``.html``); never raises for a cell
    error: the entry records it. ``timeout``: seconds one cell may run (None = no limit); a cell past it fails the
    point."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    target = out_dir / f"{stem}.ipynb"
    t0 = time.perf_counter()
    error = None
    try:
        with _package_importable():
            pm.execute_notebook(str(src), str(target), parameters=parameters, kernel_name=kernel_name,
                                progress_bar=False, cwd=os.getcwd(), execution_timeout=timeout)
    except PapermillExecutionError as e:
        error = _failure(e)
    except Exception as e:  # kernel died, notebook unreadable...: still a failed point, the others go on
        error = _failure(e)
    seconds = time.perf_counter() - t0
    page = None
    if html_export and target.is_file():
        export_html(target, out_dir / f"{stem}.html")
        page = f"{stem}.html"
    return ReportEntry(parameters, target.name if target.is_file() else "", page, error is None, seconds, error)


def render_index(title: str, entries: Sequence[ReportEntry], source: str) -> str:
    """The index page: one row per grid point with links, parameters, status and the failing cell."""
    keys = list(dict.fromkeys(k for e in entries for k in e.parameters))
    esc = lambda v: html.escape(v if isinstance(v, str) else json.dumps(v))  # noqa: E731
    rows = []
    for e in entries:
        links = " ".join(f'<a href="{html.escape(f)}">{lbl}</a>' for f, lbl in ((e.html, "html"), (e.notebook,
                                                                                                     "ipynb")) if f)
        status = "ok" if e.ok else f'<span class="fail">failed</span><pre>{html.escape(e.error or "")}</pre>'
        cells = "".join(f"<td>{esc(e.parameters[k]) if k in e.parameters else ''}</td>" for k in keys)
        rows.append(f"<tr><td>{links}</td>{cells}<td>{status}</td><td>{e.seconds:.1f}</td></tr>")
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    failed = sum(not e.ok for e in entries)
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}} .fail{{color:#c00;font-weight:bold}}
pre{{margin:0;white-space:pre-wrap;max-width:60em}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Notebook <code>{html.escape(source)}</code>: {len(entries)} run(s), {failed} failed.
Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>
<table><thead><tr><th>report</th>{head}<th>status</th><th>seconds</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table></body></html>
"""


def run_report(notebook: str | Path, out: Path = Path("reports"), grid: Sequence[str] = (),
               parameters: Sequence[str] = (), html: bool = True, kernel_name: str | None = None,
               timeout: float | None = None) -> list[ReportEntry]:
    """Execute ``notebook`` over the cartesian ``grid`` (``["key=v1,v2", ...]``) with the fixed ``parameters``
    (``["key=value", ...]``) into ``out/<name>/`` (see the module docstring); returns the entries.

    A notebook with an ``interactive`` parameter (the step-through notebooks: ipywidgets controls) runs with
    ``interactive=False`` (static figures) unless it is given: widget cells can stall a headless kernel. ``timeout``
    limits each cell (seconds; None = no limit).

    ValueError for unknown parameter names or a key both fixed and on the grid (before anything runs);
    :class:`ReportError` after all points ran when any failed.
    """
    from tqdm.auto import tqdm

    src = resolve_notebook(notebook)
    axes, fixed = parse_grid(list(grid)), parse_parameters(list(parameters))
    both = sorted(set(axes) & set(fixed))
    if both:
        raise ValueError(f"parameters {both} are both on the grid and fixed")
    known = notebook_parameters(src)
    unknown = sorted((set(axes) | set(fixed)) - set(known))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for {src.name}; its parameters are {sorted(known)}")
    if "interactive" in known and "interactive" not in axes and "interactive" not in fixed:
        fixed["interactive"] = False
    points = grid_points(axes)
    stems = [point_stem(src.stem, p) for p in points]
    if len(set(stems)) < len(stems):
        raise ValueError(f"grid values map to the same file names {stems}; make the values differ in letters/digits")
    out_dir = Path(out) / report_name(src)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for point, stem in tqdm(list(zip(points, stems)), desc=f"report {src.stem}", disable=len(points) < 2):
        entry = execute_point(src, out_dir, stem, {**fixed, **point}, html, kernel_name, timeout)
        entry.grid = point
        entries.append(entry)
        status = "ok" if entry.ok else f"FAILED\n{entry.error}"
        print(f"[report] {src.stem} {point or ''}: {status} ({entry.seconds:.0f} s)", file=sys.stderr)
        (out_dir / "index.html").write_text(render_index(f"report: {report_name(src)}", entries, str(src)),
                                            encoding="utf-8")
        (out_dir / "index.json").write_text(json.dumps([asdict(e) for e in entries], indent=1, default=str) + "\n")
    failed = [e for e in entries if not e.ok]
    print(f"[report] {out_dir / 'index.html'}: {len(entries) - len(failed)} ok, {len(failed)} failed",
          file=sys.stderr)
    if failed:
        detail = "\n".join(f"- {e.grid or 'parameters'}: {e.error}" for e in failed)
        raise ReportError(f"{len(failed)} of {len(entries)} notebook run(s) failed:\n{detail}", entries)
    return entries
