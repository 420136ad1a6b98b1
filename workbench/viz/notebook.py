"""Showing figures in notebooks the same way interactively and under papermill."""
from __future__ import annotations

import io

from workbench.viz.figures import plt


def show(fig: plt.Figure, dpi: int = 110) -> None:
    """Display ``fig`` as a PNG output (whatever the matplotlib backend) and close it, so it is shown once.

    ``workbench.viz`` draws with the Agg backend; this puts the rendered image into the notebook's outputs
    (an ``image/png`` output that papermill keeps and nbconvert embeds in HTML).
    """
    from IPython.display import Image, display

    if not isinstance(fig, plt.Figure):
        raise TypeError(f"fig must be a matplotlib Figure, got {type(fig).__name__}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    display(Image(data=buf.getvalue(), format="png"))


KEPT_CELL_METADATA = ("tags",)


def strip_notebook(path: str, check: bool = False) -> bool:
    """Store the notebook at ``path`` as the repository keeps it: no outputs, no execution counts, no saved widget
    state or run timings (cell metadata keeps only ``tags``; the notebook's only ``kernelspec`` and the language
    name). Returns whether anything was (``check=True``: would be) removed; ``check`` leaves the file alone."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
        cell.metadata = nbformat.NotebookNode({k: v for k, v in cell.metadata.items() if k in KEPT_CELL_METADATA})
    lang = nb.metadata.get("language_info", {}).get("name", "python")
    nb.metadata = nbformat.NotebookNode({k: v for k, v in nb.metadata.items() if k == "kernelspec"})
    nb.metadata["language_info"] = {"name": lang}
    after = nbformat.writes(nb)
    if after != before and not check:
        nbformat.write(nb, path)
    return after != before


def strip_notebooks(folder: str = "notebooks", check: bool = False) -> list[str]:
    """:func:`strip_notebook` on every ``*.ipynb`` of ``folder``; the paths that had (``check``: have) outputs or
    state. ``python -c "from workbench.viz.notebook import strip_notebooks; strip_notebooks()"`` (make
    strip-notebooks)."""
    from pathlib import Path

    files = sorted(Path(folder).glob("*.ipynb"))
    if not files:
        raise ValueError(f"folder: no notebooks in {folder}")
    return [str(p) for p in files if strip_notebook(str(p), check)]
