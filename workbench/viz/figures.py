"""Matplotlib figures: palettes, label colouring, overlays, prediction grids, tick labels that do not overlap.

Every function takes plain arrays/tensors (uint8 images [3,H,W] or [H,W,3], label maps [H,W] with 255 = ignore),
so notebooks, reports and the dashboard share one look: a dataset's palette (VOC's for VOC), ignored pixels white.
"""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator

from workbench.data.dataset import voc_palette  # noqa: F401  (re-exported)
from workbench.ops import IGNORE
from workbench.viz.arrays import IGNORE_COLOR, colorize, to_hwc  # noqa: F401  (re-exported)
from workbench.viz.arrays import as_numpy as _np


def overlay(image, labels, palette: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
    """Image blended with its coloured labels (background class 0 and ignored pixels left unblended)."""
    img = to_hwc(image).astype(np.float32)
    col = colorize(labels, palette).astype(np.float32)
    lab = _np(labels)
    w = np.where((lab != 0) & (lab != IGNORE), alpha, 0.0)[..., None]
    return (img * (1 - w) + col * w).astype(np.uint8)


def legend_handles(class_names: Sequence[str], palette: Sequence[Sequence[int]]) -> list[Patch]:
    """Legend patches, one per class."""
    return [Patch(facecolor=np.asarray(palette[i]) / 255, edgecolor="black", label=n)
            for i, n in enumerate(class_names)]


def prediction_grid(images: Sequence, columns: dict[str, Sequence], palette: Sequence[Sequence[int]],
                    class_names: Sequence[str], title: str | None = None, cell: float = 1.8) -> plt.Figure:
    """A grid: one row per image; first column the image, then one coloured label map per entry of ``columns``
    (e.g. {"ground truth": gts, "supervised": preds_a, "unimatch": preds_b}); a class legend below."""
    n, m = len(images), len(columns) + 1
    fig, axes = plt.subplots(n, m, figsize=(cell * m, cell * n + 0.9), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(to_hwc(images[i]))
        for j, maps in enumerate(columns.values(), 1):
            axes[i, j].imshow(colorize(maps[i], palette), interpolation="nearest")
        for j, name in enumerate(["image", *columns]):
            if i == 0:
                axes[i, j].set_title(name, fontsize=9)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    ncol = max(1, min(len(class_names), int(cell * m / 1.1)))
    rows = -(-len(class_names) // ncol)
    fig.legend(handles=legend_handles(class_names, palette), loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, min(0.3, 0.22 * rows / n), 1, 0.97 if title else 1))
    return fig


def training_curves(records: dict[str, list[dict]], keys: Sequence[str], title: str | None = None,
                    ncols: int | None = None) -> plt.Figure:
    """Curves of metrics.jsonl records: one panel per key, one line per run (``records[run] = [...]``).

    Panels fill rows of ``ncols`` (default: one row). A run keeps one colour in every panel; the legend (first
    panel) lists every run with data in any panel.
    """
    if not keys:
        raise ValueError("keys is empty")
    ncols = len(keys) if ncols is None else max(1, min(ncols, len(keys)))
    nrows = -(-len(keys) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.8 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    shown: dict[str, str] = {}
    for ax, key in zip(axes.flat, keys):
        for i, (run, recs) in enumerate(records.items()):
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            if pts:
                shown[run] = f"C{i % 10}"
                ax.plot(*zip(*pts), color=shown[run], label=run, marker="." if len(pts) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        step_axis(ax)
        ax.grid(alpha=0.3)
    if shown:
        axes[0, 0].legend(handles=[Line2D([], [], color=c, label=r) for r, c in shown.items()], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fit_tick_labels(fig)
    return fig


# ------------------------------------------------------------------------------------------- tick labels


def step_label(value: float, _pos: object = None) -> str:
    """Tick text of a training step: ``1350``, ``12k``, ``12.5k`` (thousands from 10 000 up keep labels short)."""
    v = int(round(value))
    return f"{v / 1000:g}k" if abs(v) >= 10000 else str(v)


def step_axis(ax: plt.Axes, max_ticks: int = 5) -> None:
    """Training steps on the x axis of ``ax``: at most ``max_ticks`` + 1 integer ticks at round values (1, 2, 2.5 or
    5 times a power of ten apart) labelled by :func:`step_label`, so that ``0 150 300 ... 1350`` style crowds do not
    happen on a 3-inch panel."""
    ax.xaxis.set_major_locator(MaxNLocator(nbins=max_ticks, integer=True, steps=[1, 2, 2.5, 5, 10], min_n_ticks=2))
    ax.xaxis.set_major_formatter(FuncFormatter(step_label))


def _drawn_labels(ax: plt.Axes, which: str) -> list[tuple[float, object]]:
    """(tick position in pixels along the axis, label) of the non-empty visible tick labels inside the view."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = sorted(ax.get_xlim() if which == "x" else ax.get_ylim())
    eps = 1e-9 * (hi - lo)
    out = []
    locs = axis.get_majorticklocs()
    for t, tick in zip(locs, axis.get_major_ticks(len(locs))):  # get_majorticklabels() skips hidden labels
        lab = tick.label1
        if lab.get_visible() and lab.get_text() and lo - eps <= t <= hi + eps:
            xy = ax.transData.transform((t, 0) if which == "x" else (0, t))
            out.append((float(xy[0] if which == "x" else xy[1]), lab))
    return out


def _collide(a, b, renderer, pad: float) -> bool:
    """Whether two drawn tick labels overlap. Upright and vertical text: their boxes; text at another angle:
    the gap between the two parallel text lines (tick spacing x sine of the angle) against the text height."""
    (pa, la), (pb, lb) = a, b
    rot = la.get_rotation() % 180
    if rot in (0.0, 90.0) or rot != lb.get_rotation() % 180:
        ba, bb = la.get_window_extent(renderer), lb.get_window_extent(renderer)
        return ba.x1 + pad > bb.x0 and bb.x1 + pad > ba.x0 and ba.y1 + pad > bb.y0 and bb.y1 + pad > ba.y0
    height = max(la.get_fontsize(), lb.get_fontsize()) * la.figure.dpi / 72
    return abs(pa - pb) * abs(np.sin(np.radians(rot))) < height + pad


def overlapping_tick_labels(fig: plt.Figure, pad: float = 1.0) -> list[tuple[plt.Axes, str]]:
    """``(axes, "x" or "y")`` of every visible axis of ``fig`` whose drawn tick labels overlap (closer than ``pad``
    pixels). Draws the figure first."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    out = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for which in ("x", "y"):
            labs = sorted(_drawn_labels(ax, which), key=lambda pl: pl[0])
            if any(_collide(a, b, renderer, pad) for a, b in zip(labs, labs[1:])):
                out.append((ax, which))
    return out


def _loosen(ax: plt.Axes, which: str, min_fontsize: float) -> None:
    """One step towards tick labels that fit: fewer ticks on a numeric axis; on an axis of fixed labels (class
    names), x labels turn to 45 then 90 degrees, then the font shrinks, then every other label is hidden."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    labels = [lab for _, lab in _drawn_labels(ax, which)]
    if not isinstance(axis.get_major_locator(), FixedLocator):
        n = len(labels)
        loc = axis.get_major_locator()
        if isinstance(loc, MaxNLocator):
            loc.set_params(nbins=max(1, n - 2), min_n_ticks=2)
        else:
            axis.set_major_locator(MaxNLocator(nbins=max(1, n - 2), min_n_ticks=2))
        return
    rot = labels[0].get_rotation() % 180 if labels else 0
    size = labels[0].get_fontsize() if labels else min_fontsize
    if which == "x" and rot < 45:
        for lab in axis.get_majorticklabels():
            lab.set(rotation=45, ha="right", rotation_mode="anchor")
    elif which == "x" and rot < 90:
        for lab in axis.get_majorticklabels():
            lab.set(rotation=90, ha="center", rotation_mode="default")
    elif size > min_fontsize:
        for lab in axis.get_majorticklabels():
            lab.set_fontsize(max(min_fontsize, size - 1))
    else:
        for lab in labels[1::2]:
            lab.set_visible(False)


def fit_tick_labels(fig: plt.Figure, min_fontsize: float = 6.0, max_rounds: int = 12) -> plt.Figure:
    """Loosen the tick labels of every axis of ``fig`` until none overlap (see :func:`_loosen`), in place; returns
    ``fig``. A figure with a layout engine (``layout="constrained"``) re-lays itself out at every draw, so rotated
    labels get their room; call ``fig.tight_layout()`` again after it for a tight-layout figure whose labels turned.
    """
    for _ in range(max_rounds):
        bad = overlapping_tick_labels(fig)
        if not bad:
            break
        for ax, which in bad:
            _loosen(ax, which, min_fontsize)
    return fig
