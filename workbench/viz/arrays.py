"""Label maps and images as RGB arrays: what every picture of the package (figures, step-through, dashboard) draws
with. numpy and torch only, so the dashboard's first page can use it without importing the figures' matplotlib
or the data pipeline's torchvision."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from workbench.ops import IGNORE

IGNORE_COLOR = (255, 255, 255)
RGB = np.ndarray  # uint8 [H, W, 3]


def as_numpy(x: Tensor | np.ndarray) -> np.ndarray:
    """A tensor (detached, on the CPU) or array-like as a numpy array."""
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def to_hwc(image: Tensor | np.ndarray) -> RGB:
    """uint8 image as [H, W, 3] (accepts [3, H, W] or [H, W, 3]; floats in [0, 1] or [0, 255] are scaled)."""
    a = as_numpy(image)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = a.transpose(1, 2, 0)
    if a.dtype != np.uint8:
        a = np.clip(a * (255 if a.max() <= 1.0 else 1), 0, 255).astype(np.uint8)
    return a


def colorize(labels: Tensor | np.ndarray, palette: Sequence[Sequence[int]]) -> RGB:
    """Label map [H, W] -> RGB uint8 [H, W, 3]: ``palette[k]`` for class k, white for 255 (ignore), black for a
    class beyond the palette; ValueError for labels outside [0, 255]."""
    lab = as_numpy(labels).astype(np.int64)
    lut = np.zeros((256, 3), dtype=np.uint8)
    pal = np.asarray(palette, dtype=np.uint8)[:255]
    lut[: len(pal)] = pal
    lut[IGNORE] = IGNORE_COLOR
    if lab.min() < 0 or lab.max() > 255:
        raise ValueError(f"labels must lie in [0, 255], got [{lab.min()}, {lab.max()}]")
    return lut[lab]
