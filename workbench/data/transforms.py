"""Joint image+mask transforms on uint8 tensors (torchvision.transforms.v2).

Images stay ``uint8`` [3, H, W] until they reach the device, where :func:`normalize` turns a batch into floats;
this keeps augmentation cheap in loader workers and the host-to-device copy 4x smaller.

- weak: random rescale by a factor in ``scale_range``, random crop padded with 0 (image) and 255 (mask), h-flip;
- strong (on top of a weak view, image only): colour jitter (0.5, 0.5, 0.5, 0.25) with p = 0.8, grayscale p = 0.2,
  Gaussian blur sigma in [0.1, 2.0] with p = 0.5 (FixMatch/UniMatch);
- CutMix boxes: area 2%-40% of the crop, aspect 0.3-3.3, drawn with probability 0.5.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from workbench.ops import IGNORE


class RandomRescale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range`` (both sides, aspect kept; masks use nearest)."""

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        super().__init__()
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.scale_range = (float(lo), float(hi))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        lo, hi = self.scale_range
        s = lo + (hi - lo) * torch.rand(()).item()
        return {"size": [max(1, round(h * s)), max(1, round(w * s))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if isinstance(inpt, tv_tensors.Mask):
            return TF.resize(inpt, params["size"], interpolation=v2.InterpolationMode.NEAREST_EXACT)
        if isinstance(inpt, tv_tensors.Image):
            return TF.resize(inpt, params["size"], interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        return inpt


def weak_transform(crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0), flip: bool = True) -> v2.Compose:
    """Weak view: rescale, crop ``crop_size`` (pad image 0, masks 255), horizontal flip. Applies to Image+Masks."""
    ops: list[v2.Transform] = [
        RandomRescale(scale_range),
        v2.RandomCrop(crop_size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}),
    ]
    if flip:
        ops.append(v2.RandomHorizontalFlip(0.5))
    return v2.Compose(ops)


def strong_transform(blur_sigma: tuple[float, float] = (0.1, 2.0)) -> v2.Compose:
    """Strong photometric view (image only): jitter p=0.8, grayscale p=0.2, blur p=0.5.

    The blur kernel spans +-3 sigma_max (13 taps for sigma up to 2), approximating PIL's GaussianBlur(radius=sigma)
    used by the reference code.
    """
    k = 2 * math.ceil(3 * blur_sigma[1]) + 1
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(0.5, 0.5, 0.5, 0.25)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel_size=k, sigma=blur_sigma)], p=0.5),
    ])


def cutmix_box(size: int | tuple[int, int], p: float = 0.5, area: tuple[float, float] = (0.02, 0.4),
               ratio: tuple[float, float] = (0.3, 1 / 0.3), generator: torch.Generator | None = None) -> Tensor:
    """A CutMix box as a bool mask [H, W] (all False with probability 1 - p).

    Box area = U(area) x H x W, aspect h/w = U(ratio), sides clipped to the crop, position uniform among the
    positions where the box fits.
    """
    h, w = (size, size) if isinstance(size, int) else size
    box = torch.zeros(h, w, dtype=torch.bool)
    u = torch.rand(4, generator=generator).tolist()
    if u[0] >= p:
        return box
    a = (area[0] + (area[1] - area[0]) * u[1]) * h * w
    r = ratio[0] + (ratio[1] - ratio[0]) * u[2]
    bh = min(h, max(1, int(math.sqrt(a * r))))
    bw = min(w, max(1, int(math.sqrt(a / r))))
    y = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
    x = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
    box[y:y + bh, x:x + bw] = True
    return box


def normalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 [B, 3, H, W] (any device) -> float32 normalised by mean/std given in [0, 1] units."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 images, got {images.dtype}")
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
    return (images.float() - m) / s


def denormalize(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Inverse of :func:`normalize`: float [B, 3, H, W] -> float in [0, 1] for display."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)
