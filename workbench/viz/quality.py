"""Figures of pseudo-label quality: a captured batch (image, ground truth, pseudo-label, confidence with its colour
bar, confident pseudo-labels, error map) and per-class quality as bars or curves over training.

Inputs are a weak-to-strong capture (``artifacts/step_<N>.pt``: ``x_w`` uint8 [B,3,H,W], ``y_u``/``pseudo`` uint8
[B,H,W], ``conf`` [B,H,W], ``confident`` bool, ``ignore`` uint8 with 255 = padding) and the per-class dicts of
:func:`workbench.runs.class_quality`. Class colours always come from the dataset's palette.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.patches import Patch
from torch import Tensor

from workbench.ops import IGNORE
from workbench.viz.figures import colorize, fit_tick_labels, legend_handles, plt, step_axis, to_hwc

# error map colours: confident and right, confident and wrong, below the threshold, padding / ignored
ERROR_COLORS = {"confident, correct": (70, 220, 70), "confident, wrong": (214, 39, 40),
                "below threshold": (190, 190, 190), "ignored": (255, 255, 255)}
QUALITY_KEYS = ("iou", "precision", "mask_ratio", "mining_ratio")


def error_map(pseudo: Tensor, confident: Tensor, gt: Tensor, valid: Tensor | None = None) -> np.ndarray:
    """RGB uint8 [H, W, 3] of one image: green = confident and equal to ``gt``, red = confident and wrong, grey =
    below the threshold, white = padding (``valid`` False) or ignored in ``gt`` (255). Inputs [H, W]."""
    if not (pseudo.shape == confident.shape == gt.shape) or pseudo.dim() != 2:
        raise ValueError(f"pseudo, confident and gt must be [H, W] of one shape, got {tuple(pseudo.shape)}, "
                         f"{tuple(confident.shape)}, {tuple(gt.shape)}")
    cols = np.asarray(list(ERROR_COLORS.values()), dtype=np.uint8)
    p, g, c = pseudo.long(), gt.long(), confident.bool()
    code = torch.where(c, torch.where(p == g, 0, 1), 2)
    dead = g == IGNORE if valid is None else (g == IGNORE) | ~valid
    code = torch.where(dead, 3, code)
    return cols[code.numpy()]


def pseudo_label_panel(capture: dict[str, Tensor], palette: Sequence[Sequence[int]], class_names: Sequence[str],
                       n: int = 4, title: str | None = None, cell: float = 1.7) -> plt.Figure:
    """One row per unlabeled image of a capture (first ``n``): weak view, ground truth, pseudo-label, confident
    pseudo-label (others white), the error map and the confidence (colour bar at the right); class and error
    legends below.
    Padding pixels are white in every label map."""
    need = ["x_w", "y_u", "pseudo", "conf", "confident"]
    missing = [k for k in need if k not in capture]
    if missing:
        raise ValueError(f"capture lacks {missing}; a weak-to-strong run with unlabeled ground truth has them")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    n = min(n, capture["x_w"].shape[0])
    valid = capture["ignore"] != IGNORE if "ignore" in capture else torch.ones_like(capture["confident"])
    titles = ["weak view", "ground truth", "pseudo-label", "confident pseudo-label", "errors", "confidence"]
    fig, axes = plt.subplots(n, len(titles), figsize=(cell * len(titles) + 0.6, cell * n + 1.1), squeeze=False,
                             layout="constrained")
    conf_im = None
    for i in range(n):
        v = valid[i]
        pseudo = torch.where(v, capture["pseudo"][i].long(), IGNORE)
        confident = capture["confident"][i].bool() & v
        panels = [to_hwc(capture["x_w"][i]), colorize(torch.where(v, capture["y_u"][i].long(), IGNORE), palette),
                  colorize(pseudo, palette), colorize(torch.where(confident, pseudo, IGNORE), palette),
                  error_map(capture["pseudo"][i], confident, capture["y_u"][i], v), None]
        for j, img in enumerate(panels):
            ax = axes[i, j]
            if img is None:
                conf = capture["conf"][i].float().masked_fill(~v, float("nan")).numpy()
                conf_im = ax.imshow(conf, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
            else:
                ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
    fig.colorbar(conf_im, ax=axes[:, -1], location="right", shrink=0.8, label="confidence")
    err = [Patch(facecolor=np.asarray(c) / 255, edgecolor="black", label=k) for k, c in ERROR_COLORS.items()]
    fig.legend(handles=legend_handles(class_names, palette) + err, loc="outside lower center",
               ncol=min(len(class_names) + len(err), 5), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def class_quality_bars(quality: dict[str, Tensor], class_names: Sequence[str], palette: Sequence[Sequence[int]],
                       keys: Sequence[str] = QUALITY_KEYS, title: str | None = None) -> plt.Figure:
    """One panel per key of a :func:`workbench.runs.class_quality` result, one bar per class in its palette colour
    (undefined values, 0/0, are marked ``n/a``)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(0.45 * len(class_names) * len(keys) + 1.5, 3.0),
                             squeeze=False, layout="constrained")
    x = np.arange(len(class_names))
    colors = [np.asarray(palette[i]) / 255 for i in range(len(class_names))]
    for ax, key in zip(axes[0], keys):
        vals = quality[key].double().numpy()
        ax.bar(x, np.nan_to_num(vals), color=colors, edgecolor="black", linewidth=0.6)
        for i in np.flatnonzero(np.isnan(vals)):
            ax.text(i, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90)
        ax.set_xticks(x, class_names, rotation=40, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(key, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    return fit_tick_labels(fig)


def class_quality_curves(series: Sequence[tuple[int, dict[str, Tensor]]], class_names: Sequence[str],
                         palette: Sequence[Sequence[int]], keys: Sequence[str] = QUALITY_KEYS,
                         title: str | None = None) -> plt.Figure:
    """Per-class quality over training: one panel per key, one line per class (palette colour) through the
    captured steps of ``series`` (``[(step, class_quality), ...]``)."""
    if not series:
        raise ValueError("series is empty: the run has no captures")
    steps = [s for s, _ in series]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.3 * len(keys), 2.9), squeeze=False, layout="constrained")
    for ax, key in zip(axes[0], keys):
        defined = False
        for c, name in enumerate(class_names):
            ys = [float(q[key][c]) for _, q in series]
            defined |= not all(np.isnan(ys))
            ax.plot(steps, ys, color=np.asarray(palette[c]) / 255, marker="o", markersize=3, label=name)
        if not defined:
            ax.text(0.5, 0.5, "undefined at every step (0/0)", ha="center", va="center", fontsize=8,
                    transform=ax.transAxes)
        pad = 0.5 if len(steps) == 1 else 0.02 * (steps[-1] - steps[0])
        ax.set_xlim(steps[0] - pad, steps[-1] + pad)
        step_axis(ax)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncol=min(len(class_names), 6),
               fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fit_tick_labels(fig)
