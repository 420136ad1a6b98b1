"""Patch masks for masked-image consistency (MaskMatch's LCR, S4MIM's masked streams).

The image is cut into ``patch x patch`` tiles, starting at the top-left corner; when ``H`` or ``W`` is not a multiple
of ``patch`` the last, partial row/column of tiles counts as patches too. Every tile is either visible or hidden as a
whole. Strategies (MaskMatch Table 9 / Fig. 4):

- ``random``: each patch hidden independently with probability ``ratio`` (MaskMatch Eq. 5, gamma = 0.7, p = 32);
- ``block``: BEiT-style blockwise masking: rectangles of patches, area uniform in ``[min(16, left), left]`` patches
  (``left`` = patches still to hide) and aspect ratio log-uniform in ``[0.3, 1/0.3]``, placed uniformly; a
  rectangle is kept only if it hides at least one new patch and no more than ``left``; up to 10 tries per
  rectangle; it stops once ``round(ratio * patches)`` are hidden or no try succeeds (so it may stop a little short);
- ``grid``: one patch of every 2x2 group stays visible, the same one of the four in every group (a random choice
  per image); ``ratio`` is not used (3 of 4 hidden).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from workbench.ops.host import host_scalar

__all__ = ["patch_mask", "MASK_STRATEGIES"]

MASK_STRATEGIES = ("random", "block", "grid")


def _positive_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def patch_mask(
    batch: int,
    height: int,
    width: int,
    patch: int,
    ratio: float,
    strategy: str = "random",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Sample patch masks.

    Args:
        batch, height, width: mask size ``B, H, W`` in pixels.
        patch: patch side in pixels.
        ratio: target fraction of hidden patches, in ``[0, 1]`` (not used by ``grid``).
        strategy: ``"random"``, ``"block"`` or ``"grid"`` (see the module docstring).
        generator: optional ``torch.Generator`` (draws happen on its device) for reproducible masks.
        device: device of the result (default: the generator's device, else CPU).

    Returns:
        float32 ``[B, 1, H, W]`` with 1 = visible, 0 = hidden, constant on every patch.
    """
    for name, value in (("batch", batch), ("height", height), ("width", width), ("patch", patch)):
        _positive_int(name, value)
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be a number in [0, 1], got {ratio!r}")
    if strategy not in MASK_STRATEGIES:
        raise ValueError(f"strategy must be one of {MASK_STRATEGIES}, got {strategy!r}")
    rows, cols = -(-height // patch), -(-width // patch)
    draw = generator.device if generator is not None else torch.device(device or "cpu")
    if strategy == "random":
        hidden = torch.rand(batch, rows, cols, generator=generator, device=draw) < ratio
    elif strategy == "block":  # a Python loop of small draws: on the host unless the generator lives elsewhere
        host = generator.device if generator is not None else torch.device("cpu")
        hidden = torch.stack([_blocks(rows, cols, ratio, generator, host) for _ in range(batch)]).to(draw)
    else:
        offset = torch.randint(4, (batch, 1, 1), generator=generator, device=draw)
        r = torch.arange(rows, device=draw)[:, None] % 2
        c = torch.arange(cols, device=draw)[None, :] % 2
        hidden = (r * 2 + c)[None] != offset
    visible = (~hidden).float().repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2)
    visible = visible[:, None, :height, :width]
    return visible.to(device) if device is not None else visible


def _blocks(rows: int, cols: int, ratio: float, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """One BEiT-style blockwise mask of ``rows x cols`` patches (True = hidden)."""
    hidden = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    target = round(ratio * rows * cols)
    done = 0

    def read(t: Tensor) -> float:  # CPU reads are not GPU synchronisations
        return host_scalar(t) if t.device.type == "cpu" else t.item()

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * read(torch.rand((), generator=generator, device=device))

    while done < target:
        left = target - done
        for _ in range(10):
            area = uniform(min(16, left), left)
            aspect = math.exp(uniform(math.log(0.3), math.log(1 / 0.3)))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (1 <= h <= rows and 1 <= w <= cols):
                continue
            top = int(read(torch.randint(rows - h + 1, (), generator=generator, device=device)))
            lft = int(read(torch.randint(cols - w + 1, (), generator=generator, device=device)))
            new = h * w - int(read(hidden[top : top + h, lft : lft + w].sum()))
            if 0 < new <= left:
                hidden[top : top + h, lft : lft + w] = True
                done += new
                break
        else:
            break
    return hidden
