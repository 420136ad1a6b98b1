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

Each point leaves a record in ``<out>/<name>/.grid/`` (``plan.json``: the points; ``<stem>.json``: one outcome), so
that running the same grid again skips the points that finished (same parameters, same notebook source) and executes
the others: a point that was interrupted trains on from its run's ``latest.pt``, because its parameters name the same
run (``rerun=True`` / ``--rerun`` executes every point again). A notebook with an ``out`` parameter (its own figure
folder, e.g. the quickstart's) gets ``out=<out>/<name>/<stem>`` per point on a grid of several points, unless ``out``
is given: points must not overwrite each other's figures, least of all when they run at the same time.

Points can run concurrently (``jobs``/``devices``: one process per point, see :mod:`workbench.scaleout`) or as Slurm
jobs (``executor="slurm"``); the index then shows the points that did not finish yet as queued/running.
"""
from __future__ import annotations

import hashlib
import html
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


class ReportInputError(ValueError):
    """Bad input to a report (a parameter name, a grid, a scale-out option): raised before anything runs."""


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
    state: str = ""
    """``ok``, ``failed``, or for a point without an outcome yet ``queued``/``running``/``pending``"""
    where: str = ""
    """where it ran (``device 1``, ``slot 0``, ``job 42_1``, ``this process``)"""

    def __post_init__(self) -> None:
        self.state = self.state or ("ok" if self.ok else "failed")


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
        raise ReportInputError(f"{what} {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key.isidentifier():
        raise ReportInputError(f"{what} {item!r}: {key!r} is not a notebook parameter name")
    return key, raw


_EXP_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml(raw: str, what: str) -> Any:
    """YAML value of ``raw``; exponent floats without a dot (``1e-3``, a string in YAML 1.1) become floats, and a
    value starting with ``*`` or ``&`` (a glob such as ``*-s0``; YAML would read an alias or anchor) is the string
    itself, so globs need no quoting."""
    if raw.strip()[:1] in ("*", "&"):
        return raw.strip()
    try:
        v = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ReportInputError(f"{what}: cannot parse {raw!r}: {e}") from None
    return float(v) if isinstance(v, str) and _EXP_FLOAT.fullmatch(v.strip()) else v


def parse_parameters(items: Sequence[str]) -> dict[str, Any]:
    """``["iters=20", "methods=[a, b]"]`` -> ``{"iters": 20, "methods": ["a", "b"]}`` (values as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        key, raw = _key_value(item, "parameter")
        if key in out:
            raise ReportInputError(f"parameter {key!r} given twice")
        out[key] = _yaml(raw, f"parameter {key}")
    return out


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    """``["seed=0,1", "method=a,b"]`` -> ``{"seed": [0, 1], "method": ["a", "b"]}`` (axis order kept)."""
    out: dict[str, list[Any]] = {}
    for item in items:
        key, raw = _key_value(item, "grid axis")
        if key in out:
            raise ReportInputError(f"grid axis {key!r} given twice")
        texts = split_values(raw)
        if any(t == "" for t in texts):
            raise ReportInputError(f"grid axis {item!r}: empty value")
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
        raise ReportInputError(f"notebook {path} has no cell tagged 'parameters'")
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
                  kernel_name: str | None = None, timeout: float | None = None, stream: bool = False) -> ReportEntry:
    """Execute ``src`` with ``parameters`` into ``out_dir/<stem>.ipynb`` (and ``.html``); never raises for a cell
    error: the entry records it. ``timeout``: seconds one cell may run (None = no limit); a cell past it fails the
    point. ``stream``: echo the kernel's stdout/stderr (training progress) on this process's as it comes."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    target = out_dir / f"{stem}.ipynb"
    t0 = time.perf_counter()
    error = None
    echo = {"stdout_file": sys.stdout, "stderr_file": sys.stderr} if stream else {}
    try:
        with _package_importable():
            pm.execute_notebook(str(src), str(target), parameters=parameters, kernel_name=kernel_name,
                                progress_bar=False, cwd=os.getcwd(), execution_timeout=timeout, **echo)
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
    """The index page: one row per grid point with links, parameters, status (and where it ran) and the failing
    cell; points without an outcome yet show as queued/running/pending."""
    keys = list(dict.fromkeys(k for e in entries for k in e.parameters))
    esc = lambda v: html.escape(v if isinstance(v, str) else json.dumps(v))
    rows = []
    for e in entries:
        links = " ".join(f'<a href="{html.escape(f)}">{lbl}</a>' for f, lbl in ((e.html, "html"), (e.notebook,
                                                                                                     "ipynb")) if f)
        if e.state == "ok":
            status = "ok"
        elif e.state == "failed":
            status = f'<span class="fail">failed</span><pre>{html.escape(e.error or "")}</pre>'
        else:
            status = f'<span class="wait">{html.escape(e.state)}</span>'
        if e.where:
            status += f' <span class="where">({html.escape(e.where)})</span>'
        cells = "".join(f"<td>{esc(e.parameters[k]) if k in e.parameters else ''}</td>" for k in keys)
        secs = f"{e.seconds:.1f}" if e.state in ("ok", "failed") else ""
        rows.append(f"<tr><td>{links}</td>{cells}<td>{status}</td><td>{secs}</td></tr>")
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    failed = sum(e.state == "failed" for e in entries)
    waiting = sum(e.state not in ("ok", "failed") for e in entries)
    more = f", {waiting} not finished" if waiting else ""
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}} .fail{{color:#c00;font-weight:bold}}
.wait{{color:#a60}} .where{{color:#777;font-size:small}}
pre{{margin:0;white-space:pre-wrap;max-width:60em}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Notebook <code>{html.escape(source)}</code>: {len(entries)} run(s), {failed} failed{more}.
Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>
<table><thead><tr><th>report</th>{head}<th>status</th><th>seconds</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table></body></html>
"""


# ------------------------------------------------------------------------------------------ grid plan


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass
class GridPoint:
    """One point of a planned grid: its file stem, its grid values and all its notebook parameters."""

    stem: str
    grid: dict[str, Any]
    parameters: dict[str, Any]

    @property
    def label(self) -> str:
        """``seed=0 method=unimatch`` (the stem's notebook name when the grid is empty)."""
        return " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in self.grid.items()) or \
            self.stem


@dataclass
class GridPlan:
    """A report's points and how to execute them; saved as ``<out_dir>/.grid/plan.json`` so that worker processes,
    Slurm jobs and ``workbench report --status`` see the same grid."""

    notebook: str
    """the notebook's path (absolute)"""
    source_hash: str
    """sha256 of the notebook file: a finished point counts as finished only for the same source"""
    out_dir: str
    cwd: str
    """the working directory the notebooks run in"""
    points: list[GridPoint]
    html: bool = True
    kernel_name: str | None = None
    timeout: float | None = None

    @property
    def dir(self) -> Path:
        """The report directory ``<out>/<name>/`` (absolute: workers may run elsewhere)."""
        return Path(self.cwd) / self.out_dir

    @property
    def state_dir(self) -> Path:
        """``<report dir>/.grid``: the plan, one record per finished point, the Slurm job ids."""
        return self.dir / ".grid"

    @property
    def title(self) -> str:
        """Title of the index page."""
        return f"report: {report_name(Path(self.notebook))}"

    def point(self, stem: str) -> GridPoint:
        """The point with file stem ``stem`` (KeyError naming the stems otherwise)."""
        for p in self.points:
            if p.stem == stem:
                return p
        raise KeyError(f"no grid point {stem!r} in {self.state_dir / 'plan.json'}; points: "
                       f"{[p.stem for p in self.points]}")

    def save(self) -> Path:
        """Write ``plan.json`` (creating the report directory); returns its path."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path = self.state_dir / "plan.json"
        _write_atomic(path, json.dumps(asdict(self), indent=1, default=str) + "\n")
        return path

    @classmethod
    def load(cls, path: Path) -> GridPlan:
        """Read a ``plan.json``."""
        d = json.loads(Path(path).read_text())
        d["points"] = [GridPoint(**p) for p in d["points"]]
        return cls(**d)

    def _key(self, point: GridPoint) -> str:
        return json.dumps([self.source_hash, point.parameters], sort_keys=True, default=str)

    def record(self, point: GridPoint) -> ReportEntry | None:
        """The recorded outcome of ``point`` for this plan's source and parameters (None when there is none)."""
        f = self.state_dir / f"{point.stem}.json"
        try:
            d = json.loads(f.read_text())
        except (OSError, ValueError):
            return None
        if d.pop("key", None) != self._key(point):
            return None
        d.pop("finished_at", None)
        return ReportEntry(**d)

    def write_record(self, point: GridPoint, entry: ReportEntry) -> None:
        """Record ``entry`` as the outcome of ``point``."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        d = {**asdict(entry), "key": self._key(point), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
        _write_atomic(self.state_dir / f"{point.stem}.json", json.dumps(d, indent=1, default=str) + "\n")

    def finished(self, point: GridPoint) -> bool:
        """``point`` ran to the end with this source and these parameters and its executed copy is there."""
        r = self.record(point)
        return r is not None and r.ok and (self.dir / r.notebook).is_file()

    def entries(self, live: dict[str, tuple[str, str]] | None = None) -> list[ReportEntry]:
        """Every point's entry in grid order: its record, else ``live[stem]`` = (state, where), else pending."""
        out = []
        for p in self.points:
            e = self.record(p)
            if e is None:
                state, where = (live or {}).get(p.stem, ("pending", ""))
                e = ReportEntry(p.parameters, "", None, False, 0.0, None, state=state, where=where)
            e.grid = p.grid
            out.append(e)
        return out

    def write_index(self, live: dict[str, tuple[str, str]] | None = None) -> list[ReportEntry]:
        """Rewrite ``index.html`` and ``index.json`` from the records (``live``: see :meth:`entries`)."""
        entries = self.entries(live)
        rel = os.path.relpath(self.notebook, self.cwd)
        _write_atomic(self.dir / "index.html", render_index(self.title, entries, self.notebook if rel.startswith("..")
                                                            else rel))
        _write_atomic(self.dir / "index.json", json.dumps([asdict(e) for e in entries], indent=1, default=str)
                      + "\n")
        return entries


def plan_report(notebook: str | Path, out: Path = Path("reports"), grid: Sequence[str] = (),
                parameters: Sequence[str] = (), html: bool = True, kernel_name: str | None = None,
                timeout: float | None = None) -> GridPlan:
    """Check the inputs of a report and plan its points (nothing is written); see :func:`run_report`."""
    try:
        src = resolve_notebook(notebook)
    except FileNotFoundError as e:
        raise ReportInputError(str(e)) from None
    axes, fixed = parse_grid(list(grid)), parse_parameters(list(parameters))
    both = sorted(set(axes) & set(fixed))
    if both:
        raise ReportInputError(f"parameters {both} are both on the grid and fixed")
    known = notebook_parameters(src)
    unknown = sorted((set(axes) | set(fixed)) - set(known))
    if unknown:
        raise ReportInputError(f"unknown parameter(s) {unknown} for {src.name}; its parameters are {sorted(known)}")
    if "interactive" in known and "interactive" not in axes and "interactive" not in fixed:
        fixed["interactive"] = False
    points = grid_points(axes)
    stems = [point_stem(src.stem, p) for p in points]
    if len(set(stems)) < len(stems):
        raise ReportInputError(f"grid values map to the same file names {stems}; make the values differ in "
                               "letters/digits")
    out_dir = Path(out) / report_name(src)
    per_point_out = "out" in known and "out" not in axes and "out" not in fixed and len(points) > 1
    planned = [GridPoint(stem, point, {**fixed, **point, **({"out": str(out_dir / stem)} if per_point_out else {})})
               for point, stem in zip(points, stems)]
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    return GridPlan(str(src.resolve()), digest, str(out_dir), os.getcwd(), planned, html, kernel_name, timeout)


def run_plan_point(plan: GridPlan, stem: str, where: str = "this process", stream: bool = False) -> ReportEntry:
    """Execute one point of ``plan`` in the plan's working directory and record its outcome (what a worker
    process or a Slurm job runs)."""
    point = plan.point(stem)
    old = os.getcwd()
    os.chdir(plan.cwd)
    try:
        entry = execute_point(Path(plan.notebook), plan.dir, stem, point.parameters, plan.html, plan.kernel_name,
                              plan.timeout, stream=stream)
    finally:
        os.chdir(old)
    entry.grid, entry.where = point.grid, where
    plan.write_record(point, entry)
    return entry


def point_line(point: GridPoint, entry: ReportEntry, name: str) -> str:
    """The one-line outcome of a point printed as it finishes (the failing cell on the next lines)."""
    where = f", {entry.where}" if entry.where and entry.where != "this process" else ""
    line = f"[report] {name} {point.grid or ''}: {'ok' if entry.ok else 'FAILED'} ({entry.seconds:.0f} s{where})"
    return line if entry.ok else f"{line}\n{entry.error}"


def finish_report(plan: GridPlan) -> list[ReportEntry]:
    """Rewrite the index, print the summary line; ReportError naming the failed points when any failed."""
    entries = plan.write_index()
    failed = [e for e in entries if e.state == "failed"]
    waiting = [e for e in entries if e.state not in ("ok", "failed")]
    more = f", {len(waiting)} not finished" if waiting else ""
    print(f"[report] {plan.dir / 'index.html'}: {len(entries) - len(failed) - len(waiting)} ok, {len(failed)} "
          f"failed{more}", file=sys.stderr)
    if failed:
        detail = "\n".join(f"- {e.grid or 'parameters'}: {e.error}" for e in failed)
        raise ReportError(f"{len(failed)} of {len(entries)} notebook run(s) failed:\n{detail}", entries)
    return entries


def run_report(notebook: str | Path, out: Path = Path("reports"), grid: Sequence[str] = (),
               parameters: Sequence[str] = (), html: bool = True, kernel_name: str | None = None,
               timeout: float | None = None, *, jobs: int = 1, devices: Sequence[int] | str | None = None,
               executor: str = "local", slurm: Any = None, wait: bool = True, rerun: bool = False,
               progress: bool = True) -> list[ReportEntry]:
    """Execute ``notebook`` over the cartesian ``grid`` (``["key=v1,v2", ...]``) with the fixed ``parameters``
    (``["key=value", ...]``) into ``out/<name>/`` (see the module docstring); returns the entries.

    A notebook with an ``interactive`` parameter (the step-through notebooks: ipywidgets controls) runs with
    ``interactive=False`` (static figures) unless it is given: widget cells can stall a headless kernel. ``timeout``
    limits each cell (seconds; None = no limit).

    Scale-out (:mod:`workbench.scaleout`): ``jobs`` > 1 runs that many points at once, one process each (CPU threads
    split between them); ``devices`` (``[0, 1]`` or ``"0,1"``) runs one point per CUDA device at a time
    (CUDA_VISIBLE_DEVICES); ``executor="slurm"`` submits the points as a Slurm job array through submitit with the
    :class:`workbench.scaleout.SlurmOptions` ``slurm`` and, with ``wait``, follows them to the end. Points that
    finished before (same parameters and notebook source) are skipped unless ``rerun``.

    ReportInputError (a ValueError) for unknown parameter names, a key both fixed and on the grid, or bad scale-out
    options (before anything runs); :class:`ReportError` after all points ran when any failed.

    ``progress``: while points execute, print the progress of the training runs they write (step, loss, latest
    validation mIoU, ETA; :class:`workbench.progress.RunWatcher`) under each point's ``runs`` parameter (the
    notebook's default when not given; ``runs`` when the notebook has none).
    """
    from tqdm.auto import tqdm

    plan = plan_report(notebook, out, grid, parameters, html, kernel_name, timeout)
    if executor not in ("local", "slurm"):
        raise ReportInputError(f"executor {executor!r}: expected 'local' or 'slurm'")
    name = Path(plan.notebook).stem
    runner = None
    if executor == "slurm" or jobs != 1 or devices is not None:
        from workbench import scaleout

        runner = scaleout.prepare(plan, executor=executor, jobs=jobs, devices=devices, slurm=slurm)
    plan.save()
    todo = []
    for p in plan.points:
        if not rerun and plan.finished(p):
            print(f"[report] {name} {p.grid or ''}: finished earlier, skipped (rerun to execute it again)",
                  file=sys.stderr)
        else:
            todo.append(p)
            (plan.state_dir / f"{p.stem}.json").unlink(missing_ok=True)  # its outcome is about to be replaced
    plan.write_index()
    with _watch_runs(plan, todo if progress and (wait or executor == "local") else []):
        if runner is not None:
            runner(todo, wait=wait)
            return plan.entries() if executor == "slurm" and not wait else finish_report(plan)
        for p in tqdm(todo, desc=f"report {name}", disable=len(todo) < 2):
            entry = run_plan_point(plan, p.stem)
            print(point_line(p, entry, name), file=sys.stderr)
            plan.write_index()
    return finish_report(plan)


@contextmanager
def _watch_runs(plan: GridPlan, points: Sequence[GridPoint]) -> Iterator[None]:
    """Follow the training runs of ``points`` (their ``runs`` directories) while the body executes them."""
    from contextlib import ExitStack

    from workbench.progress import RunWatcher

    roots: list[Path] = []
    if points:
        try:
            default = notebook_parameters(Path(plan.notebook)).get("runs", {}).get("default")
            default = yaml.safe_load(default) if isinstance(default, str) else None
        except Exception:  # an unreadable default: the usual folder
            default = None
        from workbench.paths import project_root

        for p in points:
            runs = p.parameters.get("runs", default if isinstance(default, str) else "runs")
            # a notebook resolves a relative path against the project root (workbench.paths) or, if it does not
            # use that helper, against its working directory: follow both when they differ
            candidates = [Path(runs)] if Path(runs).is_absolute() else [Path(plan.cwd) / runs, project_root() / runs]
            for root in candidates:
                if root.resolve() not in [r.resolve() for r in roots]:
                    roots.append(root)
    start = time.time()
    with ExitStack() as stack:
        for root in roots:
            stack.enter_context(RunWatcher(root, since=start))
        yield
