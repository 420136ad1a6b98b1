"""The house's layer rules, read from the package's import graph (no module is imported to check them).

Every ``import`` statement of every module counts, wherever it stands (module level, inside a function, under
``if TYPE_CHECKING``): a function-level import is still a dependency, only a later one. ``from a.b import c`` is an
edge to the module ``a.b.c`` when that module exists, else to ``a.b`` (importing the name ``c``); relative imports
are resolved against the importing module's package.

The rules (a module "is in" a layer when its dotted name is the layer or starts with it plus a dot):

1. ``workbench.ops`` imports nothing of the package outside ``workbench.ops`` (tensor operations are the bottom
   layer; ``workbench.registry`` likewise imports nothing of the package).
2. ``workbench.methods`` never imports ``workbench.engine``, ``workbench.viz``, ``workbench.runs`` or
   ``workbench.dashboard`` (a method is one training step; the loop, the analyses and the displays sit above it).
3. ``workbench.models`` imports neither ``workbench.methods`` nor ``workbench.engine``.
4. ``workbench.viz`` and ``workbench.dashboard`` never train. Precisely: they import neither the module that holds
   the training loop (``workbench.engine.trainer``: ``Trainer``, ``train``, ``evaluate_run``) nor, from any module,
   a name that starts a training run (:data:`TRAINING_ENTRY_POINTS`: ``train``, ``Trainer``, ``train_run``,
   ``training_command``). Building a model/method, loading a run's checkpoint and reading run directories go
   through the public builders (``workbench.engine.build``), which they may use.
5. No import cycle between the top-level layers :data:`LAYERS`: the graph whose nodes are the layers and whose edges
   are the module edges between different layers has no cycle.

A failure lists every offending edge as ``path:line: importer -> imported``.
"""
from __future__ import annotations

import ast
import textwrap
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "workbench"
LAYERS = ("config", "data", "models", "ops", "methods", "engine", "runs", "viz", "dashboard", "report")
TRAINING_LOOP = "workbench.engine.trainer"
TRAINING_ENTRY_POINTS = ("train", "Trainer", "train_run", "training_command")


@dataclass(frozen=True)
class Edge:
    """One import: ``src`` (importing module) -> ``dst`` (imported module), the names taken from it, where."""

    src: str
    dst: str
    names: tuple[str, ...]
    path: str
    line: int

    def __str__(self) -> str:
        names = f" ({', '.join(self.names)})" if self.names else ""
        return f"{self.path}:{self.line}: {self.src} -> {self.dst}{names}"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file of every module of the package at ``root`` (a directory named after it)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_edges(root: Path) -> list[Edge]:
    """Every import edge between modules of the package at ``root`` (module- and function-level alike)."""
    modules = module_names(root)
    package = root.name
    edges = []
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        rel = path.relative_to(root.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[tuple[str, tuple[str, ...]]] = []
            if isinstance(node, ast.Import):
                targets = [(a.name, ()) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                taken = tuple(a.name for a in node.names if f"{mod}.{a.name}" not in modules)
                targets = [(f"{mod}.{a.name}", ()) for a in node.names if f"{mod}.{a.name}" in modules]
                targets += [(mod, taken)] if taken else []
            for dst, names in targets:
                if dst == package or dst.startswith(package + "."):
                    # ``import a.b.c`` of a name that is not a module: the longest module prefix
                    while dst not in modules and "." in dst:
                        dst = dst.rsplit(".", 1)[0]
                    edges.append(Edge(name, dst, names, rel, node.lineno))
    return edges


def within(module: str, layer: str) -> bool:
    """Whether ``module`` is ``layer`` or inside it."""
    return module == layer or module.startswith(layer + ".")


def layer_of(module: str, package: str) -> str | None:
    """The top-level layer (one of :data:`LAYERS`) holding ``module``; None for other top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == package and parts[1] in LAYERS else None


def layer_cycles(edges: list[Edge], package: str) -> list[list[Edge]]:
    """For every pair of layers that reach each other, the edges that close the loop: the cross-layer edges whose
    target layer reaches back to the source layer."""
    graph: dict[str, set[str]] = {}
    cross = []
    for e in edges:
        a, b = layer_of(e.src, package), layer_of(e.dst, package)
        if a and b and a != b:
            graph.setdefault(a, set()).add(b)
            cross.append((a, b, e))

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph.get(node, ()))
        return False

    bad = [e for a, b, e in cross if reaches(b, a)]
    return [bad] if bad else []


def violations(root: Path) -> dict[str, list[Edge]]:
    """Rule name -> offending edges of the package at ``root`` (see the module docstring)."""
    pkg = root.name
    edges = import_edges(root)
    out: dict[str, list[Edge]] = {}

    def rule(name: str, bad: list[Edge]) -> None:
        if bad:
            out[name] = bad

    ops, registry = f"{pkg}.ops", f"{pkg}.registry"
    rule("ops imports nothing of the package",
         [e for e in edges if within(e.src, ops) and not within(e.dst, ops)])
    rule("registry imports nothing of the package", [e for e in edges if within(e.src, registry)])
    upper = [f"{pkg}.{x}" for x in ("engine", "viz", "runs", "dashboard")]
    rule("methods never import engine, viz, runs or dashboard",
         [e for e in edges if within(e.src, f"{pkg}.methods") and any(within(e.dst, u) for u in upper)])
    rule("models import neither methods nor engine",
         [e for e in edges if within(e.src, f"{pkg}.models")
          and (within(e.dst, f"{pkg}.methods") or within(e.dst, f"{pkg}.engine"))])
    loop = f"{pkg}{TRAINING_LOOP[len('workbench'):]}"
    rule("viz and dashboard never train",
         [e for e in edges if (within(e.src, f"{pkg}.viz") or within(e.src, f"{pkg}.dashboard"))
          and (within(e.dst, loop) or any(n in TRAINING_ENTRY_POINTS for n in e.names))])
    for cycle in layer_cycles(edges, pkg):
        rule("no import cycle between the top-level layers", cycle)
    return out


def report(found: dict[str, list[Edge]]) -> str:
    """The failure message: each broken rule and its edges."""
    return "\n".join(f"{rule}:\n" + "\n".join(f"  {e}" for e in bad) for rule, bad in found.items())


# ---------------------------------------------------------------------------------------------- the package


def test_the_package_keeps_the_layer_rules():
    found = violations(PACKAGE_DIR)
    assert not found, "layer rules broken (file:line: importer -> imported):\n" + report(found)


def test_the_checker_sees_the_package():
    """The graph holds edges known to exist (so an empty violation list is not an empty graph)."""
    edges = import_edges(PACKAGE_DIR)
    pairs = {(e.src, e.dst) for e in edges}
    assert ("workbench.methods.corrmatch", "workbench.methods.fixmatch") in pairs   # module level
    assert ("workbench.cli", "workbench.engine.trainer") in pairs                   # function level
    assert len(edges) > 150


# -------------------------------------------------------------------------- the checker on a bad fake package

FAKE = {
    "__init__.py": "",
    "config.py": "import yaml\n",
    "registry.py": "from fake import config\n",                               # registry imports the package
    "ops/__init__.py": "IGNORE = 255\n",
    "ops/masking.py": "import torch\nfrom fake.ops import IGNORE\n"
                      "def f():\n    from fake.engine.syncs import host_scalar\n",  # ops -> engine (function)
    "ops/losses.py": "from . import masking\nfrom .. import config\n",        # relative: ops -> config
    "models/__init__.py": "from .deeplab import Net\n",
    "models/deeplab.py": "from fake.methods.base import Method\n",            # models -> methods
    "methods/__init__.py": "",
    "methods/base.py": "from fake.config import Config\n",
    "methods/fixmatch.py": "from fake.engine.optim import ema_update\nimport fake.viz.figures\n",
    "engine/__init__.py": "",
    "engine/syncs.py": "",
    "engine/optim.py": "",
    "engine/trainer.py": "def train():\n    pass\n",
    "engine/build.py": "def train():\n    pass\n",
    "viz/__init__.py": "",
    "viz/figures.py": "from fake import runs\n",
    "viz/stepthrough.py": "def open_session():\n    from fake.engine.trainer import load_method\n",
    "runs.py": "def dataset_info():\n    from fake.viz.figures import voc_palette\n"
               "def train_run():\n    from fake.engine.trainer import train\n",
    "dashboard/__init__.py": "",
    "dashboard/app.py": "from fake.runs import train_run\nfrom fake.engine.build import load_method\n",
}


def write_package(root: Path, files: dict[str, str]) -> Path:
    """Write ``files`` (relative path -> source) as the package directory ``root``."""
    for rel, src in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(src))
    return root


def lines(found: dict[str, list[Edge]], rule: str) -> set[str]:
    """``path:line`` of the edges that break ``rule`` (substring of the rule's name)."""
    (key,) = [k for k in found if rule in k]
    return {f"{e.path}:{e.line}" for e in found[key]}


def test_the_checker_catches_every_rule(tmp_path):
    found = violations(write_package(tmp_path / "fake", FAKE))
    assert lines(found, "ops imports") == {"fake/ops/masking.py:4", "fake/ops/losses.py:2"}
    assert lines(found, "registry") == {"fake/registry.py:1"}
    assert lines(found, "methods never") == {"fake/methods/fixmatch.py:1", "fake/methods/fixmatch.py:2"}
    assert lines(found, "models") == {"fake/models/deeplab.py:1"}
    # the trainer module, even for a builder; a training entry point by name, from any module; not the builders
    assert lines(found, "never train") == {"fake/viz/stepthrough.py:2", "fake/dashboard/app.py:1"}
    # runs <-> viz (also through a function-level import); methods -> viz -> runs -> engine is no cycle
    assert lines(found, "cycle") == {"fake/viz/figures.py:1", "fake/runs.py:2"}
    message = report(found)
    assert "fake/ops/masking.py:4: fake.ops.masking -> fake.engine.syncs (host_scalar)" in message
    assert "fake/dashboard/app.py:1: fake.dashboard.app -> fake.runs (train_run)" in message


def test_a_clean_fake_package_passes(tmp_path):
    clean = {k: v for k, v in FAKE.items()
             if k not in ("registry.py", "ops/masking.py", "ops/losses.py", "models/deeplab.py", "methods/fixmatch.py",
                          "viz/stepthrough.py", "runs.py", "dashboard/app.py")}
    clean["models/deeplab.py"] = "import torch\nclass Net: ...\n"
    clean["engine/optim.py"] = "from fake.methods import base\nfrom fake.ops import IGNORE\n"
    clean["runs.py"] = "def train_run():\n    from fake.engine.build import train\n"
    clean["dashboard/app.py"] = "from fake.engine.build import load_method\nfrom fake import runs\n"
    assert violations(write_package(tmp_path / "fake", clean)) == {}


def test_relative_imports_resolve(tmp_path):
    root = write_package(tmp_path / "fake", {
        "__init__.py": "from . import ops\n", "ops/__init__.py": "from .a import x\nfrom . import b\n",
        "ops/a.py": "x = 1\nfrom ..ops import b\n", "ops/b.py": "import fake.ops.a\n"})
    assert {(e.src, e.dst, e.names) for e in import_edges(root)} == {
        ("fake", "fake.ops", ()), ("fake.ops", "fake.ops.a", ("x",)), ("fake.ops", "fake.ops.b", ()),
        ("fake.ops.a", "fake.ops.b", ()), ("fake.ops.b", "fake.ops.a", ())}


# ------------------------------------------------------------- method-specific code stays in the method's module

METHOD_NEUTRAL = ("config.py", "registry.py", "engine/evaluate.py")
METHOD_SPECIFIC = ("scalematch", "cif_multiscale", "has_cif", "cif_scales")


def code_words(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every identifier, attribute and non-documentation string of the module at ``path`` (a bare
    string statement is documentation: docstrings and attribute docstrings)."""
    tree = ast.parse(path.read_text())
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs:
            out.append((n.lineno, n.value))
        elif isinstance(n, ast.Name):
            out.append((n.lineno, n.id))
        elif isinstance(n, ast.Attribute):
            out.append((n.lineno, n.attr))
    return out


def test_evaluation_and_config_name_no_method():
    """The evaluation and the configuration serve a method's own evaluation mode through the registry
    (:class:`workbench.registry.EvalMode`, :meth:`workbench.config.MethodConfig.provides_eval_mode`), never by the
    method's name: no code of theirs (documentation aside) names ScaleMatch or its CIF mode."""
    bad = [f"workbench/{rel}:{line}: {text!r}" for rel in METHOD_NEUTRAL
           for line, text in code_words(PACKAGE_DIR / rel) if any(w in text.lower() for w in METHOD_SPECIFIC)]
    assert not bad, "method-specific names in method-neutral modules:\n" + "\n".join(bad)


def test_code_words_skip_documentation(tmp_path):
    path = tmp_path / "m.py"
    path.write_text('"""scalematch doc"""\nX = 1\n"""scalematch attribute doc"""\n'
                    'def f(mode):\n    """doc"""\n    return mode == "cif_multiscale" or cfg.has_cif\n')
    assert sorted(w for w in code_words(path) if w[1] in ("cif_multiscale", "has_cif")) == [
        (6, "cif_multiscale"), (6, "has_cif")]
    assert not any("scalematch" in w for _, w in code_words(path))
