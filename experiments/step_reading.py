"""What a reader has to open to follow one training step of each method: every function of the ``workbench``
package that runs during one ``training_step`` (default config, the tiny model, one batch of the embedded
synthetic dataset, CPU, one thread), recorded with ``sys.setprofile``.

Per method: the distinct functions and files that ran and the source lines of those functions (the union of their
line ranges, so a nested function is not counted twice), split into "method logic" (``workbench/methods`` and
``workbench/ops``) and "other" (models, engine, ...); the lines of the entry points (``training_step``, plus
``stages`` where the class has one) and of the functions they call directly; the number of ``workbench`` classes in
the method's MRO; and the files. Comprehensions, generator expressions and lambdas are not counted as functions
(their lines lie inside the function that runs them).

The workbench imported is whichever comes first on the path, so the same script measures another checkout:

    python experiments/step_reading.py --label after
    git worktree add ../before <commit> && PYTHONPATH=../before python experiments/step_reading.py --label before
    python experiments/step_reading.py --merge reports/refactor/step_reading_before.json \\
        reports/refactor/step_reading_after.json

Writes ``step_reading_<label>.json`` and ``.md`` (or, with ``--merge``, ``step_reading.md``: before -> after per
method) under ``--out`` (default reports/refactor/).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

METHODS = ("fixmatch", "unimatch", "maskmatch", "s4mim", "scalematch", "corrmatch", "rankmatch")
LOGIC_DIRS = ("workbench/methods/", "workbench/ops/")
SPEC = dict(image_size=[32, 32], num_train=40, num_val=8, label_fractions=["1-4"], seed=3)
STEP = dict(iteration=100, epoch=10, total_iters=200, iters_per_epoch=10)   # past ScaleMatch's CIF warm-up


def tiny_config(name: str, data_root: Path, out_dir: Path) -> Any:
    """The default config of method ``name`` on the tiny model (resnet18 x 0.25) and the embedded dataset."""
    from workbench.config import config_from_dict

    return config_from_dict({
        "name": "reading", "out_dir": str(out_dir), "method": {"name": name},
        "data": {"root": str(data_root), "split": "1-4", "crop_size": 32, "batch_size": 2, "num_workers": 0,
                 "synthetic": SPEC},
        "model": {"width": 0.25, "head_width": 0.25, "aspp_rates": [1, 2, 3]},
        "train": {"iters": 4, "progress": False, "seed": 0},
    })


def builder():
    """``build_from_config`` wherever this checkout keeps it (``engine.build`` now, ``engine.trainer`` before)."""
    try:
        from workbench.engine.build import build_from_config
    except ImportError:
        from workbench.engine.trainer import build_from_config
    return build_from_config


class CallRecorder:
    """A ``sys.setprofile`` hook recording the code objects of the package run and, for each, the nearest package
    frame above it (its caller as a reader sees it: ``self.model(x)`` calls the model's ``forward``)."""

    def __init__(self, package_dir: Path) -> None:
        self.prefix = str(package_dir) + "/"
        self.codes: dict[Any, None] = {}
        self.edges: set[tuple[Any, Any]] = set()

    def ours(self, code: Any) -> bool:
        """Whether ``code`` was compiled from a file inside the package."""
        return code.co_filename.startswith(self.prefix)

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event != "call" or not self.ours(frame.f_code):
            return
        self.codes.setdefault(frame.f_code)
        up = frame.f_back
        while up is not None and not self.ours(up.f_code):
            up = up.f_back
        if up is not None:
            self.edges.add((up.f_code, frame.f_code))


def source_lines(code: Any) -> set[int]:
    """The line numbers of ``code``'s source (decorators included)."""
    lines, start = inspect.getsourcelines(code)
    return set(range(start, start + len(lines)))


def summarise(codes: list[Any], root: Path) -> dict[str, Any]:
    """Functions (qualified name, file, first line, lines), distinct files and the union of their lines."""
    funcs, covered = [], set()
    for c in codes:
        rel = Path(c.co_filename).relative_to(root).as_posix()
        lines = source_lines(c)
        covered |= {(rel, n) for n in lines}
        funcs.append({"function": c.co_qualname, "file": rel, "line": c.co_firstlineno, "lines": len(lines)})
    funcs.sort(key=lambda f: (f["file"], f["line"]))
    return {"functions": len(funcs), "files": sorted({f["file"] for f in funcs}), "lines": len(covered),
            "function_list": funcs}


def measure(name: str, data_root: Path, tmp: Path) -> dict[str, Any]:
    """The reading record of one ``training_step`` of method ``name``."""
    import workbench
    from workbench.data.dataset import SegDataset, StepDataset, StepPlan
    from workbench.methods import SemiBatch, StepInfo

    cfg = tiny_config(name, data_root, tmp / name)
    lab, unl = SegDataset(data_root, "labeled_1-4"), SegDataset(data_root, "unlabeled_1-4")
    ds = StepDataset(lab, unl, StepPlan(len(lab), len(unl), 2, 2, 1, 0, 0, True), 32)
    ds.total_steps = 1
    torch.manual_seed(0)
    method = builder()(cfg, 6, torch.device("cpu"))
    method.train()
    batch = SemiBatch.from_loader(ds[0], torch.device("cpu"), cfg.data.mean, cfg.data.std)
    info = StepInfo(**STEP, capture=False)
    pkg = Path(workbench.__file__).resolve().parent
    rec = CallRecorder(pkg)
    torch.manual_seed(1)
    sys.setprofile(rec)
    try:
        out = method.training_step(batch, info)
    finally:
        sys.setprofile(None)
    named = [c for c in rec.codes if not c.co_name.startswith("<")]
    root = pkg.parent
    logic = [c for c in named if Path(c.co_filename).relative_to(root).as_posix().startswith(LOGIC_DIRS)]
    other = [c for c in named if c not in logic]
    cls = type(method)
    entry = [cls.training_step.__code__]
    if callable(getattr(cls, "stages", None)):
        entry.append(cls.stages.__code__)
    missing = [c.co_qualname for c in entry if c not in rec.codes]
    if missing:
        raise SystemExit(f"{name}: entry point(s) {missing} did not run under the profiler")
    direct = [c for c in named if c not in entry and any((e, c) in rec.edges for e in entry)]
    return {
        "loss": float(out.loss.detach()),
        "mro_depth": sum(k.__module__.split(".")[0] == "workbench" for k in cls.__mro__),
        "mro": [f"{k.__module__}.{k.__qualname__}" for k in cls.__mro__ if k.__module__.split(".")[0] == "workbench"],
        "all": summarise(named, root),   # the two groups' functions are the "all" list's, split by file
        "logic": {k: v for k, v in summarise(logic, root).items() if k != "function_list"},
        "other": {k: v for k, v in summarise(other, root).items() if k != "function_list"},
        "entry": summarise(entry, root), "direct_callees": summarise(direct, root),
        "nested_code_objects": len(rec.codes) - len(named),
    }


def preimport() -> None:
    """Import every module of the method, op and model packages, so no module body runs under the profiler."""
    for pkg_name in ("workbench.methods", "workbench.ops", "workbench.models"):
        pkg = importlib.import_module(pkg_name)
        for m in pkgutil.walk_packages(pkg.__path__, pkg_name + "."):
            importlib.import_module(m.name)


def git_state(path: Path) -> dict[str, Any]:
    """The commit checked out at ``path`` and whether the package there differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], check=True, capture_output=True,
                              text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "."))}


def run(label: str, methods: list[str]) -> dict[str, Any]:
    """The record of every method in ``methods`` under the imported workbench."""
    import workbench
    from workbench.data.synthetic import SyntheticSpec, generate_synthetic
    from workbench.methods import METHODS as REGISTERED

    unknown = [m for m in methods if m not in REGISTERED]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; registered: {sorted(REGISTERED)}")
    torch.set_num_threads(1)
    preimport()
    pkg = Path(workbench.__file__).resolve().parent
    print(f"workbench imported from {workbench.__file__}", flush=True)
    state = git_state(pkg)
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_synthetic(Path(tmp) / "synthetic", SyntheticSpec.from_dict(SPEC), progress=False)
        records = {}
        for name in methods:
            records[name] = measure(name, root, Path(tmp))
            r = records[name]
            print(f"{name}: {r['all']['functions']} functions, {len(r['all']['files'])} files, "
                  f"{r['all']['lines']} lines, MRO depth {r['mro_depth']}", flush=True)
    args = " ".join(sys.argv[1:])
    return {"label": label, **state, "python": sys.version.split()[0], "torch": torch.__version__,
            "step": STEP, "command": f"PYTHONPATH=<checkout of {state['commit'][:7]}> python "
                                     f"experiments/step_reading.py {args}", "methods": records}


def label_markdown(rec: dict[str, Any]) -> str:
    """The markdown of one record: per method the counts, the entry points and the files."""
    dirty = " (with uncommitted changes)" if rec["dirty"] else ""
    out = [f"# Reading one training step: {rec['label']}", "",
           f"Commit measured: `{rec['commit']}`{dirty}; Python {rec['python']}, torch {rec['torch']}.", "",
           f"Command: `{rec['command']}`", "",
           "| method | functions (logic / other) | files (logic / other) | lines (logic / other) | entry lines | "
           "direct callees (lines) | MRO depth | loss |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rec["methods"].items():
        lo, ot = r["logic"], r["other"]
        out.append(f"| {name} | {r['all']['functions']} ({lo['functions']} / {ot['functions']}) | "
                   f"{len(r['all']['files'])} ({len(lo['files'])} / {len(ot['files'])}) | "
                   f"{r['all']['lines']} ({lo['lines']} / {ot['lines']}) | {r['entry']['lines']} | "
                   f"{r['direct_callees']['functions']} ({r['direct_callees']['lines']}) | {r['mro_depth']} | "
                   f"{r['loss']:.6f} |")
    for name, r in rec["methods"].items():
        out += ["", f"## {name}", "", "MRO: " + " -> ".join(f"`{k}`" for k in r["mro"]), "",
                "Entry points: " + ", ".join(f"`{f['function']}` ({f['lines']})" for f in r["entry"]["function_list"]),
                "", "Files: " + ", ".join(f"`{f}`" for f in r["all"]["files"])]
    return "\n".join(out) + "\n"


def moved_and_changed(b: dict[str, Any], a: dict[str, Any]) -> list[str]:
    """Markdown lines naming the functions that ran only before, only after, or in another file (moved)."""
    fb = {(f["file"], f["function"]) for f in b["all"]["function_list"]}
    fa = {(f["file"], f["function"]) for f in a["all"]["function_list"]}
    gone, new = fb - fa, fa - fb
    moved = {q for _, q in gone} & {q for _, q in new}

    def names(keys: set[tuple[str, str]]) -> str:
        return ", ".join(f"`{q}`" for _, q in sorted(keys, key=lambda k: (k[1], k[0])) if q not in moved) or "-"

    lines = [f"- only before: {names(gone)}", f"- only after: {names(new)}"]
    if moved:
        where = {q: [f for f, n in sorted(gone) if n == q] + [f for f, n in sorted(new) if n == q] for q in moved}
        lines.append("- moved (same name, another file): " + ", ".join(
            f"`{q}` {w[0]} -> {w[-1]}" for q, w in sorted(where.items())))
    return lines


def merge_markdown(before: dict[str, Any], after: dict[str, Any], command: str) -> str:
    """One table, per method ``before -> after`` for functions, files, lines and MRO depth, then per method the
    functions that ran on one side only."""
    def pair(b: Any, a: Any) -> str:
        return f"{b} -> {a}"

    def side(r: dict[str, Any]) -> str:
        return (f"- {r['label']}: commit `{r['commit']}`{' (with uncommitted changes)' if r['dirty'] else ''}, "
                f"measured with `{r['command']}`")

    names = [m for m in before["methods"] if m in after["methods"]]
    out = ["# Reading one training step, before and after", "", side(before), side(after),
           f"- merged with `{command}`", "",
           "One `training_step` per method (default config, tiny model, one batch of 2 labeled + 2 unlabeled 32-px "
           f"crops, CPU, one thread, `StepInfo({', '.join(f'{k}={v}' for k, v in before['step'].items())})`); every `workbench` function that ran, recorded with "
           "`sys.setprofile`. Lines = the union of those functions' source lines. Logic = `workbench/methods` and "
           "`workbench/ops`, the rest (models, engine) is other; entry = `training_step` plus `stages` where the "
           "class has one; direct callees = the functions the entry points call themselves, with their lines; "
           "MRO depth = `workbench` classes in the method's MRO. Same loss: the step's loss is bit-identical.", "",
           "| method | functions | logic functions | files | logic files | lines | logic lines | entry lines | "
           "direct callees (lines) | MRO depth | same loss |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        b, a = before["methods"][name], after["methods"][name]
        db, da = b["direct_callees"], a["direct_callees"]
        out.append(" | ".join([
            f"| {name}", pair(b["all"]["functions"], a["all"]["functions"]),
            pair(b["logic"]["functions"], a["logic"]["functions"]),
            pair(len(b["all"]["files"]), len(a["all"]["files"])),
            pair(len(b["logic"]["files"]), len(a["logic"]["files"])),
            pair(b["all"]["lines"], a["all"]["lines"]), pair(b["logic"]["lines"], a["logic"]["lines"]),
            pair(b["entry"]["lines"], a["entry"]["lines"]),
            pair(f"{db['functions']} ({db['lines']})", f"{da['functions']} ({da['lines']})"),
            pair(b["mro_depth"], a["mro_depth"]),
            "yes |" if b["loss"] == a["loss"] else f"no ({b['loss']:.6g} vs {a['loss']:.6g}) |"]))
    out += ["", "## Functions that ran on one side only"]
    for name in names:
        out += ["", f"### {name}", ""] + moved_and_changed(before["methods"][name], after["methods"][name])
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure the imported checkout (``--label``) or merge two records (``--merge BEFORE AFTER``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", default="after", help="the column name (before/after); names the output files")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="methods to measure")
    p.add_argument("--merge", nargs=2, type=Path, metavar=("BEFORE", "AFTER"),
                   help="combine two records into step_reading.md instead of measuring")
    p.add_argument("--out", type=Path, default=Path("reports/refactor"))
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.merge:
        recs = []
        for path in a.merge:
            try:
                recs.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError) as e:
                raise SystemExit(f"--merge: cannot read {path}: {e}") from None
        text = merge_markdown(*recs, "python experiments/step_reading.py " + " ".join(sys.argv[1:]))
        (a.out / "step_reading.md").write_text(text)
    else:
        rec = run(a.label, a.methods)
        (a.out / f"step_reading_{a.label}.json").write_text(json.dumps(rec, indent=1) + "\n")
        text = label_markdown(rec)
        (a.out / f"step_reading_{a.label}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
