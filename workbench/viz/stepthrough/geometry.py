"""Positions on feature grids.

A feature map of ``h x w`` cells is resized to the ``H x W`` image with ``align_corners=True`` throughout the
package, so cell ``(i, j)`` sits on pixel ``(i (H-1)/(h-1), j (W-1)/(w-1))`` and pixel ``(y, x)`` reads the cell
``(round(y (h-1)/(H-1)), round(x (w-1)/(W-1)))`` (:func:`feature_cell`, :func:`cell_position`): the package's
one rule, :mod:`workbench.ops.grid`, whose functions are re-exported here.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from workbench.ops.grid import cell_position, feature_cell

__all__ = ["feature_cell", "cell_position", "cell_extent", "upsample_map"]


def cell_extent(image_size: Sequence[int], feat_size: Sequence[int]) -> tuple[float, float, float, float]:
    """``imshow`` extent (left, right, bottom, top) that draws an ``h x w`` map of cells over an ``H x W`` image with
    cell ``(i, j)`` centred on its :func:`cell_position` (so the edge cells overhang the image by half a cell)."""
    (hh, ww), (h, w) = image_size, feat_size
    sy = (hh - 1) / (h - 1) if h > 1 else hh
    sx = (ww - 1) / (w - 1) if w > 1 else ww
    top = -sy / 2 if h > 1 else -0.5
    left = -sx / 2 if w > 1 else -0.5
    return left, left + sx * w, top + sy * h, top


def upsample_map(m: Tensor, size: Sequence[int]) -> Tensor:
    """A feature-resolution map ``[h, w]`` resized bilinearly (``align_corners=True``, as the methods do) to
    ``size`` -> float32 ``[H, W]``."""
    if m.dim() != 2:
        raise ValueError(f"map must be [h, w], got {tuple(m.shape)}")
    return F.interpolate(m.float()[None, None], size=tuple(size), mode="bilinear", align_corners=True)[0, 0]
