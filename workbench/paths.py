"""Paths that mean the same thing wherever a notebook's kernel starts.

JupyterLab starts a notebook's kernel in the notebook's folder (``notebooks/``), papermill and the command line in
the caller's working directory. A relative path such as ``runs/quickstart-unimatch-s0`` or ``data/synthetic`` is
therefore resolved here against the *project root*, not against the working directory:

1. the directory named by the environment variable ``WORKBENCH_ROOT``, when set;
2. else the first directory at or above the working directory that holds this project's ``pyproject.toml``
   (``name = "workbench"``) and the ``workbench/`` package;
3. else the checkout that holds this ``workbench`` package (an editable install run from elsewhere);
4. else the working directory.

From the project root itself nothing changes: relative paths mean what they meant on the command line. Absolute
paths pass through. This module imports nothing of the package, so every layer may use it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TypeVar

ENV = "WORKBENCH_ROOT"
_NAME = re.compile(r'^\s*name\s*=\s*["\']workbench["\']\s*$', re.MULTILINE)

P = TypeVar("P", str, Path)


def is_project_root(d: Path) -> bool:
    """True when ``d`` holds this project's ``pyproject.toml`` (``name = "workbench"``) and ``workbench/``."""
    toml = d / "pyproject.toml"
    if not (toml.is_file() and (d / "workbench" / "__init__.py").is_file()):
        return False
    try:
        return bool(_NAME.search(toml.read_text(encoding="utf-8", errors="replace")))
    except OSError:
        return False


def _find_root() -> tuple[Path, str]:
    """(project root, how it was found), following the order of the module docstring."""
    env = os.environ.get(ENV, "").strip()
    if env:
        root = Path(env).expanduser()
        if not root.is_dir():
            raise ValueError(f"{ENV}={env!r} is not a directory; unset it or point it at the project checkout")
        return root.resolve(), f"set by ${ENV}"
    cwd = Path.cwd()
    for d in (cwd, *cwd.parents):
        if is_project_root(d):
            return d, f"found at or above the working directory {cwd}"
    pkg_root = Path(__file__).resolve().parents[1]
    if is_project_root(pkg_root):
        return pkg_root, (f"the checkout holding the imported workbench package (the working directory {cwd} is "
                          "outside it)")
    return cwd, "the working directory (no project checkout above it, nor around the imported workbench package)"


def project_root() -> Path:
    """The project root relative paths resolve against (see the module docstring for how it is found)."""
    return _find_root()[0]


def describe_root() -> str:
    """One phrase for error messages: ``the project root /x/workbench, found at or above ...``."""
    root, how = _find_root()
    return f"the project root {root}, {how}"


def project_path(p: P | None) -> P | None:
    """``p`` resolved against :func:`project_root` when relative; absolute paths pass through (``~`` expanded).

    Returns the type it was given (a ``str`` stays a ``str``, so it can go into a config dict); None and ``""``
    (the notebooks' "not given") come back unchanged.
    """
    if p is None or (isinstance(p, str) and not p.strip()):
        return p
    if not isinstance(p, (str, os.PathLike)):
        raise TypeError(f"project_path expects a str or a path, got {type(p).__name__}: {p!r}")
    q = Path(p).expanduser()
    out = q if q.is_absolute() else project_root() / q
    return str(out) if isinstance(p, str) else out


def _missing(param: str, p: str | Path, resolved: Path, what: str, hint: str) -> FileNotFoundError:
    """The error of a path parameter that names no usable directory: the path tried, how, and what to do."""
    how = "" if Path(p).expanduser().is_absolute() else f" ({str(p)!r} resolved against {describe_root()})"
    return FileNotFoundError(f"{param}: {resolved} {what}{how}. {hint}")


def require_run(p: str | Path, param: str = "run", hint: str | None = None) -> Path:
    """``p`` resolved by :func:`project_path`, checked to be a run directory (one with a ``config.yaml``).

    FileNotFoundError otherwise, naming the parameter, the path tried, the project root it was resolved against,
    and what to do (``hint``; by default: create runs with ``make demo`` or pass another directory).
    """
    if p is None or not str(p).strip():
        raise ValueError(f"{param} is empty: pass a run directory, e.g. {param}='runs/quickstart-unimatch-s0'")
    resolved = Path(project_path(str(p)))
    if (resolved / "config.yaml").is_file():
        return resolved
    what = "is not a run directory (no config.yaml)" if resolved.is_dir() else "does not exist"
    hint = hint or (f"Run `make demo` in the project root first (it trains the quickstart runs under runs/), or pass "
                    f"{param}=<a run directory> (absolute, or relative to the project root)")
    raise _missing(param, p, resolved, what, hint)


def require_dir(p: str | Path, param: str, hint: str | None = None) -> Path:
    """``p`` resolved by :func:`project_path`, checked to be a directory (FileNotFoundError as :func:`require_run`)."""
    if p is None or not str(p).strip():
        raise ValueError(f"{param} is empty: pass a directory")
    resolved = Path(project_path(str(p)))
    if resolved.is_dir():
        return resolved
    what = "is not a directory" if resolved.exists() else "does not exist"
    hint = hint or f"Pass {param}=<a directory> (absolute, or relative to the project root)"
    raise _missing(param, p, resolved, what, hint)


__all__ = ["ENV", "project_root", "project_path", "describe_root", "is_project_root", "require_run", "require_dir"]
