"""CorrMatch correlation maps, pixel propagation and region propagation (CorrMatch, CVPR 2024, Secs. 3.2-3.3).

Conventions (all functions are pure; nothing here keeps state):

- A feature map ``[B, D, h, w]`` is flattened row-major, so pixel ``(y, x)`` has flat index ``y * w + x``.
- The correlation map ``C = softmax(f1^T f2 / sqrt(D))`` is ``[B, HW, HW]``; row ``i`` holds pixel ``i`` of ``f1``
  against every pixel of ``f2`` and sums to 1 (the softmax runs over the last axis).
- Pixel propagation follows the authors' code, ``pred @ C`` with ``pred`` reshaped ``[B, K, HW]``:
  ``out[b, :, j] = sum_i pred[b, :, i] * C[b, i, j]``.
- Region propagation follows Eqs. (7)-(10) with the sequential semantics of the reference loop, vectorised over
  batch and pixels (one Python loop over the shapes only), with fixed sizes and no host synchronisation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "correlation_map",
    "pixel_propagation",
    "sample_rows",
    "shapes_from_rows",
    "region_propagation",
    "region_propagation_reference",
]


def _require_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _require_dims(name: str, value: Tensor, ndim: int, layout: str) -> None:
    if value.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(value.shape)}")


def _pair(name: str, value: object) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be a pair of positive ints (height, width), got {value!r}")
    return int(value[0]), int(value[1])


def correlation_map(f1: Tensor, f2: Tensor) -> Tensor:
    """Pairwise correlation map of two feature maps (CorrMatch Eq. 4, scaling as in the authors' code).

    Args:
        f1: float ``[B, D, h, w]``, the first projection ``w1`` of the features (rows of the map).
        f2: float ``[B, D, h, w]``, the second projection ``w2`` (columns of the map).

    Returns:
        float ``[B, h*w, h*w]``: ``C[b, i, j] = softmax_j(<f1[b, :, i], f2[b, :, j]> / sqrt(D))``; every row sums
        to 1. The paper prints ``Softmax(w1^T w2) / sqrt(D)``; the reference code scales *before* the softmax, which
        is what is computed here (the scale then acts as a temperature).
    """
    _require_tensor("f1", f1)
    _require_tensor("f2", f2)
    _require_dims("f1", f1, 4, "[B, D, H, W]")
    if f1.shape != f2.shape:
        raise ValueError(f"f1 and f2 must have the same shape, got {tuple(f1.shape)} and {tuple(f2.shape)}")
    if not f1.is_floating_point() or not f2.is_floating_point():
        raise TypeError(f"f1 and f2 must be floating point, got {f1.dtype} and {f2.dtype}")
    scores = torch.bmm(f1.flatten(2).transpose(1, 2), f2.flatten(2)) / math.sqrt(f1.shape[1])
    return scores.softmax(dim=-1)


def pixel_propagation(
    logits: Tensor, corr: Tensor, feat_size: tuple[int, int] | None = None, detach_logits: bool = True
) -> Tensor:
    """Spread a prediction through a correlation map (CorrMatch Eq. 5): ``z = f1(logits) . C``.

    Args:
        logits: float ``[B, K, H, W]`` segmentation logits at any resolution.
        corr: float ``[B, h*w, h*w]`` correlation map from :func:`correlation_map`.
        feat_size: ``(h, w)`` of the features that made ``corr``. When given, ``logits`` are bilinearly resized to it
            (``align_corners=True``, the paper's ``f1``); when None, ``logits`` must already have ``H * W == h * w``.
        detach_logits: detach ``logits`` first, as the authors do (gradients then reach the model only through
            ``corr``). Set False only to study the variant.

    Returns:
        float ``[B, K, h, w]`` with ``out[b, :, j] = sum_i logits[b, :, i] * C[b, i, j]`` (flat pixel indices), i.e.
        ``logits.reshape(B, K, HW) @ C``. Upsampling back to the image is left to the caller.
    """
    _require_tensor("logits", logits)
    _require_tensor("corr", corr)
    _require_dims("logits", logits, 4, "[B, K, H, W]")
    _require_dims("corr", corr, 3, "[B, HW, HW]")
    if corr.shape[1] != corr.shape[2] or corr.shape[0] != logits.shape[0]:
        raise ValueError(
            f"corr must be [B, HW, HW] with the batch of logits {tuple(logits.shape)}, got {tuple(corr.shape)}"
        )
    if detach_logits:
        logits = logits.detach()
    if feat_size is not None:
        size = _pair("feat_size", feat_size)
        if size[0] * size[1] != corr.shape[1]:
            raise ValueError(f"feat_size {size} does not match corr's {corr.shape[1]} pixels")
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=True)
    elif logits.shape[-2] * logits.shape[-1] != corr.shape[1]:
        raise ValueError(
            f"logits {tuple(logits.shape)} do not have corr's {corr.shape[1]} pixels; pass feat_size to resize them"
        )
    b, k, h, w = logits.shape
    return torch.bmm(logits.reshape(b, k, h * w), corr.to(logits.dtype)).reshape(b, k, h, w)


def sample_rows(
    batch: int,
    num_pixels: int,
    num: int = 128,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random rows of a correlation map for region propagation (uniform, with replacement, independent per image).

    Args:
        batch: number of images ``B``.
        num_pixels: ``h*w``, the number of rows of the correlation map.
        num: rows per image ``M`` (the paper samples 128).
        generator: optional ``torch.Generator`` for reproducible draws (its device is used for drawing).
        device: device of the result (default: the generator's device, else CPU).

    Returns:
        int64 ``[B, M]`` with values in ``[0, num_pixels)``. (The reference code draws one index set shared by the
        whole batch from ``[0, HW - 1)``; drawing per image from the full range is a deliberate, documented choice.)
    """
    for name, value in (("batch", batch), ("num_pixels", num_pixels), ("num", num)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    draw_device = generator.device if generator is not None else (device or "cpu")
    rows = torch.randint(num_pixels, (batch, num), generator=generator, device=draw_device)
    return rows.to(device) if device is not None else rows


def shapes_from_rows(
    corr: Tensor, rows: Tensor, feat_size: tuple[int, int], out_size: tuple[int, int], check: bool = True
) -> Tensor:
    """Binary shapes from chosen rows of a correlation map (CorrMatch Eq. 7).

    Each chosen row ``C[b, rows[b, m], :]`` is reshaped to ``feat_size``, bilinearly resized to ``out_size``
    (``align_corners=True``), min-max normalised over its own pixels and thresholded: ``(c - min) / (max - min) > 0.5``.
    A constant row (``max == min``) gives an empty shape, as ``nan > 0.5`` is False in the authors' code.

    Args:
        corr: float ``[B, h*w, h*w]`` correlation map.
        rows: int64 ``[B, M]`` row indices into ``corr``'s second axis (see :func:`sample_rows`).
        feat_size: ``(h, w)`` of the correlation map's pixels.
        out_size: ``(H, W)`` of the pseudo-label the shapes are matched to.
        check: verify that ``rows`` lie in range (a device-to-host read, i.e. a GPU synchronisation; the training
            step passes False for rows it sampled itself).

    Returns:
        bool ``[B, M, H, W]``. Clearing CutMix-box and ignored pixels is left to the caller.
    """
    _require_tensor("corr", corr)
    _require_tensor("rows", rows)
    _require_dims("corr", corr, 3, "[B, HW, HW]")
    _require_dims("rows", rows, 2, "[B, M]")
    h, w = _pair("feat_size", feat_size)
    out_h, out_w = _pair("out_size", out_size)
    b, n, n2 = corr.shape
    if n != h * w or n2 != n:
        raise ValueError(f"corr {tuple(corr.shape)} does not match feat_size {(h, w)}")
    if rows.shape[0] != b:
        raise ValueError(f"rows has batch {rows.shape[0]}, corr has {b}")
    if rows.dtype != torch.long:
        raise TypeError(f"rows must be int64, got {rows.dtype}")
    if check and rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= n):
        raise ValueError(f"rows must lie in [0, {n}), got values in [{int(rows.min())}, {int(rows.max())}]")
    m = rows.shape[1]
    picked = torch.gather(corr, 1, rows.unsqueeze(-1).expand(b, m, n))
    maps = F.interpolate(picked.reshape(b * m, 1, h, w), size=(out_h, out_w), mode="bilinear", align_corners=True)
    maps = maps.reshape(b * m, out_h * out_w)
    low = maps.min(dim=1, keepdim=True).values
    high = maps.max(dim=1, keepdim=True).values
    shapes = (maps - low) / (high - low) > 0.5
    return shapes.reshape(b, m, out_h, out_w)


def region_propagation(
    pseudo: Tensor,
    confident: Tensor,
    shapes: Tensor,
    tau: float | Tensor,
    num_classes: int | None = None,
    check: bool = True,
) -> tuple[Tensor, Tensor]:
    """Enlarge pseudo-labels and the confident mask with correlation shapes (CorrMatch Eqs. 8-10).

    For every image, the shapes are visited in order ``m = 0 .. M-1``. With ``S`` the shape and ``Q`` the *input*
    confident mask (never the growing output mask):

    - ``r1 = |S & Q| / |S|``; the shape is skipped when ``|S & Q| == 0`` or ``r1 < tau``;
    - among the pixels of ``S & Q``, count the classes of the *current* pseudo-label (already changed by earlier
      shapes); ``k*`` is the most frequent class (ties go to the smallest class id) and ``r2`` its share;
    - if ``r2 > tau``, every pixel of ``S`` takes class ``k*`` and joins the output confident mask.

    Ratios are float32 quotients of exact integer counts, as in the authors' loop, so every comparison with ``tau``
    agrees bit for bit with a per-image, per-shape loop using ``torch.unique`` (:func:`region_propagation_reference`).

    How it runs without a host synchronisation (every size is fixed by the input shapes; nothing is selected, so no
    value is read back on a GPU): ``r1`` needs only the input mask, so it is known for all shapes up front (two
    reductions). Then one Python loop over ``m``, each step batched over the images and masked rather than
    branched: the class histogram of ``S & Q`` under the current labels (one ``scatter_add`` of the pixels into
    ``B * K`` bins), ``k*`` by ``argmax``, the verdict ``apply`` per image as a bool tensor, and the repaint as a
    ``where`` over the shape's pixels for the images where ``apply`` holds (a no-op elsewhere). The cost is a few
    passes over ``B x H x W`` per shape, whatever the data.

    Args:
        pseudo: int64 ``[B, H, W]`` pseudo-label (values under ``confident`` must lie in ``[0, num_classes)``;
            other pixels may hold anything, e.g. 255, and keep it unless a shape relabels them).
        confident: bool ``[B, H, W]`` confident (and not ignored) pixels.
        shapes: bool ``[B, M, H, W]``, already cleared of CutMix-box and ignored pixels.
        tau: the threshold (python float or 0-d tensor), used for both ``r1`` and ``r2``.
        num_classes: number of classes ``K`` (at most 32767); inferred as ``pseudo[confident].max() + 1`` when None.
        check: validate the label values (device-to-host reads; the training step passes False, with
            ``num_classes``).

    Returns:
        ``(pseudo_out, confident_out)``: new int64 ``[B, H, W]`` and bool ``[B, H, W]`` tensors (inputs untouched).
    """
    tau, num_classes = _check_region_inputs(pseudo, confident, shapes, tau, num_classes, check)
    b, m, h, w = shapes.shape
    if shapes.numel() == 0:
        return pseudo.clone(), confident.clone()
    n, k, device = h * w, num_classes, pseudo.device
    orig = pseudo.reshape(b, n)
    conf = confident.reshape(b, n)
    flat_shapes = shapes.reshape(b, m, n)
    # r1 for every shape: |S & Q| and |S| (exact integer counts; the labels do not enter)
    n_inside = (flat_shapes & conf[:, None]).sum(dim=2)
    usable = (n_inside > 0) & ~(n_inside / flat_shapes.sum(dim=2) < tau)
    # the current label of every pixel as its histogram bin b * K + class; pixels off Q (whose label is never
    # counted) sit in bin b * K until a shape paints them
    offset = torch.arange(b, device=device)[:, None] * k
    bins = (offset + torch.where(conf, orig, 0)).reshape(-1)
    # uint8 views of the masks: a broadcast product of uint8 is several times faster than one of bool on the CPU
    shape_bytes = flat_shapes.contiguous().view(torch.uint8)
    conf_bytes = conf.to(torch.uint8)
    painted = torch.zeros(b, n, dtype=torch.uint8, device=device)
    counts = torch.zeros(b * k, dtype=torch.int32, device=device)
    for j in range(m):
        shape = shape_bytes[:, j]
        counts.zero_().scatter_add_(0, bins, (shape * conf_bytes).view(-1).to(torch.int32))
        per_image = counts.view(b, k)
        top = per_image.argmax(dim=1)  # first maximum = smallest class id on ties
        best = per_image.gather(1, top[:, None]).squeeze(1).long()
        apply = usable[:, j] & (best / n_inside[:, j] > tau)
        paint = (shape * apply.to(torch.uint8)[:, None]).view(-1)
        bins = torch.where(paint.view(torch.bool), (offset + top[:, None]).expand(b, n).reshape(-1), bins)
        painted |= paint.view(b, n)
    painted = painted.view(torch.bool)
    out = torch.where(painted, bins.view(b, n) - offset, orig)
    return out.reshape(b, h, w), (conf | painted).reshape(b, h, w)



def region_propagation_reference(
    pseudo: Tensor, confident: Tensor, shapes: Tensor, tau: float | Tensor
) -> tuple[Tensor, Tensor]:
    """The rule of :func:`region_propagation` as the authors run it: a loop over images and shapes with
    ``torch.unique``. Slow; it is the executable definition that tests and the benchmark compare against.

    Args and returns as :func:`region_propagation` (classes are read from the labels directly).
    """
    _check_region_inputs(pseudo, confident, shapes, tau, None)
    pseudo, out_conf = pseudo.clone(), confident.clone()
    for b in range(shapes.shape[0]):
        for m in range(shapes.shape[1]):
            shape = shapes[b, m]
            inside = shape & confident[b]
            n_inside = inside.sum()
            if n_inside == 0 or n_inside / shape.sum() < tau:
                continue
            classes, counts = torch.unique(pseudo[b][inside], return_counts=True)
            if counts.max() / counts.sum() > tau:
                pseudo[b][shape] = classes[counts.argmax()]
                out_conf[b] |= shape
    return pseudo, out_conf


def _check_region_inputs(
    pseudo: Tensor, confident: Tensor, shapes: Tensor, tau: float | Tensor, num_classes: int | None,
    check: bool = True,
) -> tuple[float | Tensor, int]:
    """Validate :func:`region_propagation`'s arguments; return ``tau`` (on pseudo's device) and the class count.

    ``check=False`` skips the checks of the label values (device-to-host reads); ``num_classes`` is then required."""
    for name, value in (("pseudo", pseudo), ("confident", confident), ("shapes", shapes)):
        _require_tensor(name, value)
    _require_dims("pseudo", pseudo, 3, "[B, H, W]")
    _require_dims("shapes", shapes, 4, "[B, M, H, W]")
    if pseudo.dtype != torch.long:
        raise TypeError(f"pseudo must be int64, got {pseudo.dtype}")
    if confident.dtype != torch.bool or shapes.dtype != torch.bool:
        raise TypeError(f"confident and shapes must be bool, got {confident.dtype} and {shapes.dtype}")
    if confident.shape != pseudo.shape:
        raise ValueError(f"confident {tuple(confident.shape)} must match pseudo {tuple(pseudo.shape)}")
    b, _, h, w = shapes.shape
    if (b, h, w) != tuple(pseudo.shape):
        raise ValueError(f"shapes {tuple(shapes.shape)} must be [B, M, H, W] for pseudo {tuple(pseudo.shape)}")
    if shapes.device != pseudo.device or confident.device != pseudo.device:
        raise ValueError("pseudo, confident and shapes must be on the same device")
    if isinstance(tau, Tensor):
        if tau.numel() != 1:
            raise ValueError(f"tau must be a scalar, got shape {tuple(tau.shape)}")
        tau = tau.reshape(()).to(pseudo.device)
    elif not isinstance(tau, (int, float)) or isinstance(tau, bool):
        raise TypeError(f"tau must be a float or a 0-d tensor, got {type(tau).__name__}")
    if not check:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or not 0 < num_classes <= 32767:
            raise ValueError(f"num_classes must be an int in [1, 32767] when check=False, got {num_classes!r}")
        return tau, num_classes
    counted = pseudo * confident  # labels under Q, 0 elsewhere
    low, high = int(counted.min()), int(counted.max())
    if low < 0:
        raise ValueError(f"pseudo must be non-negative where confident is True, got {low}")
    if num_classes is None:
        num_classes = high + 1
    elif not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes <= high:
        raise ValueError(f"num_classes={num_classes!r} must be an int above the largest confident label {high}")
    if num_classes > 32767:
        raise ValueError(f"num_classes={num_classes} is above the supported 32767")
    return tau, num_classes
