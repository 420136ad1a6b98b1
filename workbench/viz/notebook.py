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
