"""Matplotlib helpers the step-through figures share: panels, heat maps, label maps, legends, marks and feature
cells drawn over the image (positions: :mod:`workbench.viz.stepthrough.geometry`).

Label maps use the dataset manifest's palette with padding white; "confident" panels grey out the pixels below the
threshold (:data:`NOT_CONFIDENT`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.viz.figures import IGNORE, colorize, legend_handles, plt, to_hwc
from workbench.viz.stepthrough.geometry import cell_extent

__all__ = [
    "NOT_CONFIDENT", "JOINED", "RELABELLED", "FONT", "axis_off", "show_image", "heat_map", "label_image",
    "confident_label_image", "class_legend", "below_threshold_patch", "box_outline", "figure_grid", "image_frame",
    "mark_point", "cell_map", "cell_outline", "patch_grid", "cosine_range",
]

NOT_CONFIDENT = (200, 200, 200)  # light grey: pixels below the threshold in "confident" panels
JOINED, RELABELLED = (255, 165, 0), (0, 190, 255)  # region propagation's changes (orange, light blue)
FONT = 9  # panel titles


def axis_off(ax: Any) -> None:
    """Hide the ticks of ``ax`` (the frame stays)."""
    ax.set_xticks([])
    ax.set_yticks([])


def show_image(ax: Any, img: Any, title: str, **kw: Any) -> Any:
    """``img`` in ``ax`` (nearest neighbour, no ticks) under ``title``; ``kw`` go to ``imshow``. Returns the image."""
    im = ax.imshow(img, interpolation="nearest", **kw)
    ax.set_title(title, fontsize=FONT)
    axis_off(ax)
    return im


def heat_map(fig: Any, ax: Any, values: Tensor, title: str, vmin: float | None = 0.0, vmax: float | None = 1.0,
             cmap: str = "viridis", label: str | None = None, under: Tensor | None = None,
             extent: Sequence[float] | None = None) -> Any:
    """A heat map with its own colour bar; drawn semi-transparent over the grey image ``under`` when given."""
    if under is not None:
        ax.imshow(to_hwc(under).mean(-1), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    im = ax.imshow(values.float().numpy(), vmin=vmin, vmax=vmax, cmap=cmap, interpolation="nearest",
                   alpha=0.65 if under is not None else 1.0, extent=extent)
    ax.set_title(title, fontsize=FONT)
    axis_off(ax)
    cb = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
    cb.ax.tick_params(labelsize=7)
    if label:
        cb.set_label(label, fontsize=7)
    return im


def label_image(labels: Tensor, valid: Tensor, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Coloured label map, padding white."""
    return colorize(torch.where(valid, labels.long(), IGNORE), palette)


def confident_label_image(labels: Tensor, confident: Tensor, valid: Tensor, palette: Sequence[Sequence[int]]
                          ) -> np.ndarray:
    """Coloured labels on confident pixels, light grey below the threshold, white on padding."""
    out = colorize(torch.where(confident & valid, labels.long(), IGNORE), palette)
    out[(~confident & valid).numpy()] = NOT_CONFIDENT
    return out


def class_legend(fig: Any, class_names: Sequence[str], palette: Sequence[Sequence[int]], extra: Sequence[Any] = ()
                 ) -> None:
    """The figure's legend below the panels: one patch per class, then the ``extra`` handles, then padding."""
    from matplotlib.patches import Patch

    handles = legend_handles(class_names, palette) + list(extra)
    handles.append(Patch(facecolor="white", edgecolor="black", label="padding"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=8, frameon=False)


def below_threshold_patch() -> Any:
    """The legend patch of :data:`NOT_CONFIDENT` pixels ("below threshold")."""
    from matplotlib.patches import Patch

    return Patch(facecolor=np.asarray(NOT_CONFIDENT) / 255, edgecolor="black", label="below threshold")


def box_outline(ax: Any, box: Tensor) -> None:
    """Outline of a CutMix box (bool [H, W]) in dashed white/black."""
    if bool(box.any()):
        ax.contour(box.float().numpy(), levels=[0.5], colors=["white"], linewidths=1.2, linestyles="--")


def figure_grid(rows: int, cols: int, cell: float = 2.1, extra_h: float = 0.9, extra_w: float = 0.0
                ) -> tuple[Any, Any]:
    """A figure of ``rows x cols`` square panels of ``cell`` inches (plus ``extra_h`` / ``extra_w`` for titles,
    legends and colour bars): ``(fig, axes)`` with ``axes`` always 2-D."""
    return plt.subplots(rows, cols, figsize=(cell * cols + extra_w, cell * rows + extra_h), squeeze=False,
                        layout="constrained")


def image_frame(ax: Any, size: Sequence[int]) -> None:
    """Limit ``ax`` to the ``H x W`` image (pixel centres at integers, y downwards), whatever was drawn beyond it."""
    ax.set_xlim(-0.5, size[1] - 0.5)
    ax.set_ylim(size[0] - 0.5, -0.5)


def mark_point(ax: Any, y: float, x: float, color: str = "red", label: str | None = None, size: float = 60) -> None:
    """A cross at pixel ``(y, x)``, with ``label`` beside it when given."""
    ax.scatter([x], [y], s=size, marker="x", c=color, linewidths=2)
    if label:
        ax.annotate(label, (x, y), xytext=(3, 3), textcoords="offset points", color=color, fontsize=8,
                    fontweight="bold")


def cell_map(ax: Any, rgb: np.ndarray, size: Sequence[int], title: str) -> None:
    """An ``h x w`` RGB map of feature cells drawn over an ``H x W`` image frame (align_corners positions)."""
    ax.imshow(rgb, interpolation="nearest", extent=cell_extent(size, rgb.shape[:2]))
    image_frame(ax, size)
    ax.set_title(title, fontsize=FONT)
    axis_off(ax)


def cell_outline(ax: Any, mask: Tensor, size: Sequence[int], color: Any) -> None:
    """The border of the feature cells of ``mask`` (bool [h, w]) as :func:`cell_map` draws them (every cell edge
    between a cell of the mask and one outside it)."""
    from matplotlib.collections import LineCollection

    if not bool(mask.any()):
        return
    h, w = mask.shape
    left, right, bottom, top = cell_extent(size, (h, w))
    sx, sy = (right - left) / w, (bottom - top) / h
    m = F.pad(mask.bool(), (1, 1, 1, 1)).numpy()
    segs = []
    for i, j in torch.nonzero(mask).tolist():
        x0, y0 = left + j * sx, top + i * sy
        x1, y1 = x0 + sx, y0 + sy
        if not m[i, j + 1]:
            segs.append(((x0, y0), (x1, y0)))
        if not m[i + 2, j + 1]:
            segs.append(((x0, y1), (x1, y1)))
        if not m[i + 1, j]:
            segs.append(((x0, y0), (x0, y1)))
        if not m[i + 1, j + 2]:
            segs.append(((x1, y0), (x1, y1)))
    ax.add_collection(LineCollection(segs, colors=[color], linewidths=1.5), autolim=False)


def patch_grid(ax: Any, patch: int, size: Sequence[int], color: str = "grey", alpha: float = 0.7) -> None:
    """Thin lines between the ``patch``-pixel patches of an ``H x W`` image (the patch masks' grid)."""
    h, w = size
    for t in range(patch, max(h, w), patch):
        if t < w:
            ax.axvline(t - 0.5, color=color, lw=0.4, alpha=alpha)
        if t < h:
            ax.axhline(t - 0.5, color=color, lw=0.4, alpha=alpha)


def cosine_range(values: np.ndarray) -> tuple[float, str]:
    """Colour range of cosines: [0, 1] in viridis when none is negative (ReLU features), else [-1, 1] in coolwarm."""
    finite = values[np.isfinite(values)]
    return (0.0, "viridis") if finite.size == 0 or finite.min() >= 0 else (-1.0, "coolwarm")
