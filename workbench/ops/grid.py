"""Positions on feature grids: the package's one rule for reading a label map at a feature map's cells.

A network's ``h x w`` feature (or logit) map is resized to the ``H x W`` image with ``align_corners=True``
throughout the package, so cell ``(i, j)`` sits on pixel ``(round(i (H-1)/(h-1)), round(j (W-1)/(w-1)))``: that
pixel's label is the cell's label (:func:`grid_labels`). The other way round, pixel ``(y, x)`` reads the cell
``(round(y (h-1)/(H-1)), round(x (w-1)/(W-1)))`` (:func:`feature_cell`); :func:`cell_position` gives a cell's exact
(float) position for drawing. Captures, the t-SNE views of notebooks and dashboard and
the step-through all use it, so they show the same label for the same cell.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["grid_positions", "grid_labels", "feature_cell", "cell_position"]


def grid_positions(full: int, cells: int) -> Tensor:
    """int64 [cells]: the pixel index (of ``full`` pixels) each of ``cells`` grid cells sits on,
    ``round(i (full-1)/(cells-1))``; a single cell sits on the middle pixel ``(full-1) // 2`` (its
    :func:`cell_position` is the image centre)."""
    if full < 1 or cells < 1:
        raise ValueError(f"sizes must be positive, got full={full}, cells={cells}")
    if cells == 1:
        return torch.tensor([(full - 1) // 2], dtype=torch.long)
    return torch.linspace(0, full - 1, cells, dtype=torch.float64).round().long()


def grid_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Labels [B, H, W] read at the cells of an ``size = (h, w)`` grid (:func:`grid_positions`) -> [B, h, w]."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be [B, H, W], got {tuple(labels.shape)}")
    (H, W), (h, w) = labels.shape[1:], (int(size[0]), int(size[1]))
    rows, cols = grid_positions(H, h).to(labels.device), grid_positions(W, w).to(labels.device)
    return labels[:, rows][:, :, cols]


def feature_cell(y: int, x: int, image_size: Sequence[int], feat_size: Sequence[int]) -> tuple[int, int]:
    """The feature cell ``(i, j)`` that image pixel ``(y, x)`` reads under ``align_corners=True`` resizing.

    ValueError when the pixel lies outside the ``H x W`` image."""
    (hh, ww), (h, w) = image_size, feat_size
    if not (0 <= y < hh and 0 <= x < ww):
        raise ValueError(f"pixel ({y}, {x}) lies outside the {hh} x {ww} image")
    i = round(y * (h - 1) / (hh - 1)) if hh > 1 else 0
    j = round(x * (w - 1) / (ww - 1)) if ww > 1 else 0
    return i, j


def cell_position(i: Tensor | int, j: Tensor | int, image_size: Sequence[int], feat_size: Sequence[int]
                  ) -> tuple[Any, Any]:
    """Image position ``(y, x)`` (floats) of feature cell ``(i, j)`` under ``align_corners=True`` resizing."""
    (hh, ww), (h, w) = image_size, feat_size
    y = i * (hh - 1) / (h - 1) if h > 1 else i * 0 + (hh - 1) / 2
    x = j * (ww - 1) / (w - 1) if w > 1 else j * 0 + (ww - 1) / 2
    return y, x
