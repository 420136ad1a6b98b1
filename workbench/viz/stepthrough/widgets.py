"""Notebook controls for the step-through figures: :func:`explore` shows figures as static PNG outputs (papermill)
or behind ipywidgets controls (:class:`Control`) that redraw them."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from workbench.viz.figures import plt
from workbench.viz.notebook import show

__all__ = ["Control", "explore", "explore_widget"]


@dataclass
class Control:
    """One widget control of :func:`explore`: an int or float slider (``low``..``high``, ``step``), or a dropdown
    when ``options`` is given; ``value`` is the starting value (the notebook parameter)."""

    value: Any
    low: float | None = None
    high: float | None = None
    step: float | None = None
    options: Sequence[Any] | None = None
    label: str | None = None

    def widget(self, name: str) -> Any:
        """The ipywidgets control."""
        import ipywidgets as W

        desc = self.label or name
        style = {"description_width": "initial"}
        if self.options is not None:
            if self.value not in self.options:
                raise ValueError(f"control {name}: value {self.value!r} is not among the options {list(self.options)}")
            return W.Dropdown(options=list(self.options), value=self.value, description=desc, style=style)
        if self.low is None or self.high is None:
            raise ValueError(f"control {name}: give low and high (a slider) or options (a dropdown)")
        if not self.low <= self.value <= self.high:
            raise ValueError(f"control {name}: value {self.value!r} lies outside [{self.low}, {self.high}]")
        if isinstance(self.value, int) and not isinstance(self.value, bool) and float(self.step or 1).is_integer():
            return W.IntSlider(value=self.value, min=int(self.low), max=int(self.high), step=int(self.step or 1),
                               description=desc, continuous_update=False, style=style)
        return W.FloatSlider(value=float(self.value), min=float(self.low), max=float(self.high),
                             step=float(self.step or 0.01), description=desc, continuous_update=False,
                             readout_format=".3f", style=style)


def _render(draw: Callable[..., Any], values: dict[str, Any], dpi: int) -> None:
    """Display ``draw(**values)``: figures as PNG outputs, anything else (tables) with ``display``."""
    from IPython.display import display

    result = draw(**values)
    for item in result if isinstance(result, (list, tuple)) else [result]:
        if isinstance(item, plt.Figure):
            show(item, dpi)
        elif item is not None:
            display(item)


def explore_widget(draw: Callable[..., Any], controls: dict[str, Control], dpi: int = 110) -> Any:
    """The ipywidgets box of :func:`explore` (controls above an output area), not displayed yet; the output is
    drawn once with the starting values and redrawn whenever a control changes (an error is printed there)."""
    import ipywidgets as W

    if not controls:
        raise ValueError("controls is empty: give at least one Control")
    widgets = {k: c.widget(k) for k, c in controls.items()}
    out = W.Output()

    def redraw(_: Any = None) -> None:
        with out:
            out.clear_output(wait=True)
            try:
                _render(draw, {k: w.value for k, w in widgets.items()}, dpi)
            except Exception as e:
                print(f"{type(e).__name__}: {e}")

    for w in widgets.values():
        w.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox(list(widgets.values()), layout=W.Layout(flex_flow="row wrap")), out])


def explore(draw: Callable[..., Any], controls: dict[str, Control], interactive: bool, dpi: int = 110) -> None:
    """Show ``draw(**values)`` (a Figure, or a list of Figures and displayable objects such as Tables).

    ``interactive=False`` (papermill): drawn once with the controls' starting values; figures become PNG outputs.
    ``interactive=True``: :func:`explore_widget`'s controls, displayed, redrawing on every change. Returns None (so a
    notebook cell ending with it shows nothing twice).
    """
    if interactive:
        from IPython.display import display

        display(explore_widget(draw, controls, dpi))
    else:
        _render(draw, {k: c.value for k, c in controls.items()}, dpi)
