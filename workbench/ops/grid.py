"""Positions on feature grids: the package's one rule for reading a label map at a feature map's cells.

A network's ``h x w`` feature (or logit) map is resized to the ``H x W`` image with ``align_corners=True``
throughout the package, so cell ``(i, j)`` sits on pixel ``(round(i (H-1)/(h-1)), round(j (W-1)/(w-1)))``: that
pixel's label is the cell's label (:func:`grid_labels`). Captures, the t-SNE views of notebooks and dashboard and
the step-through all use it, so they show the same label for the same cell.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["grid_positions", "grid_labels"]


def grid_positions(full: int, cells: int) -> Tensor:
    """int64 [cells]: the pixel index (of ``full`` pixels) each of ``cells`` grid cells sits on,
    ``round(i (full-1)/(cells-1))`` (0 for a single cell)."""
    if full < 1 or cells < 1:
        raise ValueError(f"sizes must be positive, got full={full}, cells={cells}")
    if cells == 1:
        return torch.zeros(1, dtype=torch.long)
    return torch.linspace(0, full - 1, cells, dtype=torch.float64).round().long()


def grid_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Labels [B, H, W] read at the cells of an ``size = (h, w)`` grid (:func:`grid_positions`) -> [B, h, w]."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be [B, H, W], got {tuple(labels.shape)}")
    (H, W), (h, w) = labels.shape[1:], (int(size[0]), int(size[1]))
    rows, cols = grid_positions(H, h).to(labels.device), grid_positions(W, w).to(labels.device)
    return labels[:, rows][:, :, cols]
