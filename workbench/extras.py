"""Optional dependency groups: what a training server needs is the core; notebooks, the dashboard, the Cityscapes
recipe and Slurm submission are extras (``pip install -e '.[notebooks,dashboard,cityscapes,slurm]'``; the README's
``make demo`` / ``make test`` install them all). A command that needs a missing extra stops with one line naming it.
"""
from __future__ import annotations

import importlib.util

EXTRAS = {
    "notebooks": ("papermill", "nbconvert", "nbformat", "ipykernel", "ipywidgets", "jupyterlab"),
    "dashboard": ("panel",),
    "cityscapes": ("cityscapesscripts",),
    "slurm": ("submitit",),
}


class MissingExtraError(ImportError):
    """A feature's optional dependencies are not installed."""


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (``find_spec``: nothing is imported)."""
    if extra not in EXTRAS:
        raise ValueError(f"extra must be one of {sorted(EXTRAS)}, got {extra!r}")
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(extra: str, what: str) -> None:
    """MissingExtraError (one line) when a module of ``extra`` is missing; ``what`` names the feature."""
    gone = missing(extra)
    if gone:
        raise MissingExtraError(f"{what} needs the '{extra}' extra ({', '.join(gone)} not installed): "
                                f"pip install -e '.[{extra}]' in the project, or make venv")
