"""Evaluation: whole-image, centre-crop and sliding-window inference, optional multi-scale + flip, then metrics.

Modes (``EvalSettings.mode``):
- "original": predict each image whole, at its own size (Pascal VOC protocol).
- "center_crop": crop image and mask to ``crop_size`` around the centre, then predict whole.
- "sliding": predict ``window``-sized tiles on a grid with ``stride`` (Cityscapes). Default tiling
  (``sliding_tiles="clipped_sum"``) as UniMatch's evaluation: tiles start at 0, stride, 2 x stride, ... while the
  start lies inside the image; border tiles are clipped to the image (smaller tiles, not shifted back) and the
  softmax of every tile is summed where tiles overlap. ``"shifted_mean"`` (switch): the last tile is shifted back to
  end at the border, images smaller than the window are zero-padded, overlapping logits are averaged.
- a mode a method provides (:class:`workbench.registry.EvalMode`, e.g. ScaleMatch's "cif_multiscale", its
  multi-scale inference fused by its CIF module): each image is predicted whole, at scale 1, inside the mode's
  ``open(settings)``, and the method's predictor returns the mode's logits (ScaleMatch's fuses the scale-1
  prediction with the prediction at every other scale of ``scales``). A predictor that does not serve the open
  request stops the evaluation with an error naming what the mode needs.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from workbench import registry
from workbench.config import BASE_EVAL_MODES, SLIDING_TILES, EvalSettings
from workbench.engine.metrics import BoundaryFMeter, ConfusionMeter, all_reduce_sum
from workbench.ops import IGNORE
from workbench.ops.ensemble import check_scales, rescale, resize_logits

__all__ = [
    "EVAL_MODES",
    "SLIDING_TILES",
    "window_starts",
    "clipped_window_starts",
    "sliding_window_probs",
    "sliding_window_coverage",
    "sliding_window_logits",
    "multiscale_logits",
    "center_crop",
    "EvalSettings",
    "evaluate",
]

EVAL_MODES = BASE_EVAL_MODES
"""The engine's own modes (a method adds its own through :mod:`workbench.registry`)."""
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """Turn an int or an (h, w) pair into a validated pair of positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or an (h, w) pair of positive ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _check_image(image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() != 4 or not image.dtype.is_floating_point:
        raise ValueError(f"image must be a float [B, C, H, W] tensor, got {image.dtype} {tuple(image.shape)}")


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows along one axis of length ``size``.

    Windows start at 0, stride, 2*stride, ...; the last one is clamped so it ends exactly at the border, so every
    position is covered. A size smaller than the window gives the single start 0 (the caller pads).
    """
    if window <= 0 or stride <= 0 or size <= 0:
        raise ValueError(f"size, window and stride must be positive, got {size}, {window}, {stride}")
    if stride > window:
        raise ValueError(f"stride ({stride}) must not exceed window ({window}), or pixels would be skipped")
    last = max(size - window, 0)
    starts = list(range(0, last + 1, stride))
    if starts[-1] != last:
        starts.append(last)
    return starts


def clipped_window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of UniMatch's sliding-window tiles along one axis of length ``size``.

    Tiles start at 0, stride, 2*stride, ... for as long as the start lies inside the image (start < size); a tile
    covers [start, min(size, start + window)), so border tiles are clipped to the image, never shifted back. E.g.
    width 2048, window 801, stride 534: 0, 534, 1068, 1602 (the last tile is 446 wide).
    """
    if window <= 0 or stride <= 0 or size <= 0:
        raise ValueError(f"size, window and stride must be positive, got {size}, {window}, {stride}")
    if stride > window:
        raise ValueError(f"stride ({stride}) must not exceed window ({window}), or pixels would be skipped")
    return list(range(0, size, stride))


def sliding_window_coverage(height: int, width: int, window: int | Sequence[int],
                            stride: int | Sequence[int], tiles: str = "shifted_mean") -> torch.Tensor:
    """How many tiles cover each pixel of a ``height`` x ``width`` image: the tiles of ``sliding_window_logits``
    (``tiles="shifted_mean"``) or of ``sliding_window_probs`` (``"clipped_sum"``).

    Returns:
        int64 tensor [height, width]; every entry is >= 1 by construction.
    """
    (wh, ww), (sh, sw) = _pair(window, "window"), _pair(stride, "stride")
    if tiles not in SLIDING_TILES:
        raise ValueError(f"tiles must be one of {SLIDING_TILES}, got {tiles!r}")
    starts = clipped_window_starts if tiles == "clipped_sum" else window_starts
    rows = torch.zeros(max(height, wh), dtype=torch.int64)
    cols = torch.zeros(max(width, ww), dtype=torch.int64)
    for y in starts(height, wh, sh):
        rows[y:y + wh] += 1
    for x in starts(width, ww, sw):
        cols[x:x + ww] += 1
    return (rows[:, None] * cols[None, :])[:height, :width]


def sliding_window_logits(fn: LogitsFn, image: torch.Tensor, window: int | Sequence[int],
                          stride: int | Sequence[int], num_classes: int | None = None) -> torch.Tensor:
    """Predict an image tile by tile and average the logits where tiles overlap.

    Args:
        fn: maps a float batch [B, C, h, w] to logits [B, K, h, w].
        image: float [B, C, H, W].
        window: tile size, int or (h, w). An image smaller than the window is zero-padded (bottom/right) to it
            and the logits are cropped back.
        stride: grid step, int or (h, w), at most the window; the last tile is clamped to the border.
        num_classes: K; None = take it from the first tile's logits.

    Returns:
        float32 logits [B, K, H, W] (each pixel the mean over the tiles covering it).
    """
    _check_image(image)
    (wh, ww), (sh, sw) = _pair(window, "window"), _pair(stride, "stride")
    b, _, h, w = image.shape
    ph, pw = max(h, wh), max(w, ww)
    if (ph, pw) != (h, w):
        image = F.pad(image, (0, pw - w, 0, ph - h))
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, ph, pw, device=image.device)
    for y in window_starts(h, wh, sh):
        for x in window_starts(w, ww, sw):
            logits = _tile_logits(fn, image[:, :, y:y + wh, x:x + ww], num_classes)
            k = logits.shape[1]
            if total is None:
                total = torch.zeros(b, k, ph, pw, device=image.device, dtype=torch.float32)
            total[:, :, y:y + wh, x:x + ww] += logits.float()
            count[:, :, y:y + wh, x:x + ww] += 1
    assert total is not None  # at least one window always exists
    return (total / count)[:, :, :h, :w]


def _tile_logits(fn: LogitsFn, tile: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    """``fn(tile)``, checked to be logits [B, K, h, w] of the tile's size (K = ``num_classes`` when given)."""
    b, _, th, tw = tile.shape
    logits = fn(tile)
    k = num_classes if num_classes is not None else logits.shape[1] if logits.dim() == 4 else -1
    if logits.shape != (b, k, th, tw):
        raise ValueError(f"fn returned logits of shape {tuple(logits.shape)} for a window of "
                         f"{(b, th, tw)}; expected {(b, k, th, tw)}")
    return logits


def sliding_window_probs(fn: LogitsFn, image: torch.Tensor, window: int | Sequence[int],
                         stride: int | Sequence[int], num_classes: int | None = None) -> torch.Tensor:
    """UniMatch's sliding-window inference: the SUM of the tiles' softmax probabilities at every pixel.

    Tiles start at :func:`clipped_window_starts` along each axis and cover [start, min(size, start + window)):
    border tiles (and an image smaller than the window) are predicted clipped, at their own smaller size; nothing is
    padded. Each tile's logits go through a softmax over classes and are added into the image-sized sum, so a pixel
    covered by n tiles holds a sum of n probability vectors (its argmax is the prediction).

    Args:
        fn: maps a float batch [B, C, h, w] to logits [B, K, h, w].
        image: float [B, C, H, W].
        window: tile size, int or (h, w).
        stride: tile step, int or (h, w), at most the window.
        num_classes: K; None = take it from the first tile's logits.

    Returns:
        float32 [B, K, H, W]: summed probabilities (each pixel sums to its number of covering tiles).
    """
    _check_image(image)
    (wh, ww), (sh, sw) = _pair(window, "window"), _pair(stride, "stride")
    b, _, h, w = image.shape
    total: torch.Tensor | None = None
    for y in clipped_window_starts(h, wh, sh):
        for x in clipped_window_starts(w, ww, sw):
            th, tw = min(h, y + wh) - y, min(w, x + ww) - x
            logits = _tile_logits(fn, image[:, :, y:y + th, x:x + tw], num_classes)
            k = logits.shape[1]
            if total is None:
                total = torch.zeros(b, k, h, w, device=image.device, dtype=torch.float32)
            total[:, :, y:y + th, x:x + tw] += logits.float().softmax(1)
    assert total is not None  # the tile at (0, 0) always exists
    return total


def multiscale_logits(fn: LogitsFn, image: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False,
                      mode: str = "original", window: int | Sequence[int] | None = None,
                      stride: int | Sequence[int] | None = None, tiles: str = "clipped_sum") -> torch.Tensor:
    """Softmax probabilities averaged over scales (and horizontal flips).

    For each scale s the image is resized to round(s * H) x round(s * W) (bilinear, align_corners=True; the rule of
    :func:`workbench.ops.ensemble.rescale`, shared with MaskMatch's multi-scale pseudo-labels), predicted
    whole ("original"/"center_crop" modes) or by sliding window ("sliding": ``window`` and ``stride`` required),
    the logits are resized back to H x W and turned into probabilities; with ``flip`` the horizontally flipped image
    is predicted too and its (un-flipped) probabilities added. The result is the mean over all predictions.

    Sliding ``tiles``: ``"clipped_sum"`` (UniMatch's tiling, :func:`sliding_window_probs`): the summed tile
    softmax divided by the number of covering tiles is the view's probability map (resized back bilinearly; the
    argmax of one view equals the reference's argmax of the sum, as the division by 1, 2 or 4 tiles at a stride
    above half the window is exact); ``"shifted_mean"``: :func:`sliding_window_logits`, then the softmax.

    Args:
        fn: maps a float batch [B, C, h, w] to logits [B, K, h, w].
        image: float [B, C, H, W].

    Returns:
        float32 probabilities [B, K, H, W] (sum to 1 over K).
    """
    _check_image(image)
    if mode not in EVAL_MODES:
        raise ValueError(f"mode must be one of {EVAL_MODES}, got {mode!r} (a method-provided mode is served by "
                         "evaluate(), not here)")
    if mode == "sliding" and (window is None or stride is None):
        raise ValueError("mode 'sliding' needs both window and stride")
    if tiles not in SLIDING_TILES:
        raise ValueError(f"tiles must be one of {SLIDING_TILES}, got {tiles!r}")
    scales = check_scales(scales)
    h, w = image.shape[-2:]

    def predict(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(logits, False) or (probabilities, True) of one view."""
        if mode == "sliding" and tiles == "clipped_sum":
            summed = sliding_window_probs(fn, x, window, stride)  # type: ignore[arg-type]
            count = sliding_window_coverage(x.shape[-2], x.shape[-1], window, stride,  # type: ignore[arg-type]
                                            "clipped_sum").to(summed.device, summed.dtype)
            return summed / count, True
        if mode == "sliding":
            return sliding_window_logits(fn, x, window, stride), False  # type: ignore[arg-type]
        logits = fn(x)
        if logits.dim() != 4 or logits.shape[0] != x.shape[0] or logits.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"fn returned logits of shape {tuple(logits.shape)} for an input of shape "
                             f"{tuple(x.shape)}; expected [B, K, H, W] at the input's resolution")
        return logits.float(), False

    probs: torch.Tensor | None = None
    for s in scales:
        scaled = rescale(image, s)
        views = [(scaled, False), (scaled.flip(-1), True)] if flip else [(scaled, False)]
        for x, flipped in views:
            out, is_prob = predict(x)
            if flipped:
                out = out.flip(-1)
            p = resize_logits(out, (h, w))
            if not is_prob:
                p = p.softmax(1)
            probs = p if probs is None else probs + p
    assert probs is not None
    return probs / (len(scales) * (2 if flip else 1))


def center_crop(image: torch.Tensor, mask: torch.Tensor,
                size: int | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop image and mask to ``size`` around the centre (top/left offset = (H - h) // 2).

    Args:
        image: [..., C, H, W] (e.g. [B, 3, H, W] or [3, H, W]).
        mask: [..., H, W] with the same H, W.
        size: int or (h, w); a dimension already no larger than the size is left as it is.

    Returns:
        (image, mask) cropped views.
    """
    ch, cw = _pair(size, "size")
    if image.dim() < 3 or mask.dim() < 2 or image.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"image [..., C, H, W] and mask [..., H, W] must share H, W; got "
                         f"{tuple(image.shape)} and {tuple(mask.shape)}")
    h, w = image.shape[-2:]
    top, left = max(h - ch, 0) // 2, max(w - cw, 0) // 2
    rows, cols = slice(top, top + min(h, ch)), slice(left, left + min(w, cw))
    return image[..., rows, cols], mask[..., rows, cols]


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, mask) from a (image, mask, ...) sequence or a dict with "image" and "mask"."""
    if isinstance(batch, dict):
        if "image" not in batch or "mask" not in batch:
            raise ValueError(f"a dict batch needs keys 'image' and 'mask', got {sorted(batch)}")
        return batch["image"], batch["mask"]
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(f"loader must yield (image, mask) pairs or dicts, got {type(batch).__name__}")


def evaluate(fn: LogitsFn, loader: Iterable[Any], num_classes: int, settings: EvalSettings,
             device: torch.device | str, ignore_index: int | None = IGNORE, progress: bool = True) -> dict[str, Any]:
    """Run inference over ``loader`` and compute segmentation metrics (summed over processes when distributed).

    Args:
        fn: maps a normalised float image batch [B, 3, h, w] to logits [B, K, h, w] at the same resolution. If it is
            an ``nn.Module`` it is put in eval mode for the run and restored afterwards.
        loader: yields (image [B, 3, H, W] float, mask [B, H, W] long) or dicts with "image" and "mask".
        num_classes: K.
        settings: mode, crop size, sliding window, scales, flip.
        device: where inference runs.
        ignore_index: mask value excluded from the metrics.
        progress: show a tqdm bar (only ever on rank 0).

    Returns:
        ``ConfusionMeter.compute()`` (miou, iou, pixel_acc, fg_iou, fg_class_acc, fg_gt_frac, fg_pred_frac, confusion)
        plus "num_images" (all processes) and "seconds" (this process's wall time); with
        ``settings.boundary_tolerance`` also ``BoundaryFMeter.compute()`` ("boundary_f", "boundary_precision",
        "boundary_recall", "boundary_f_per_class").
    """
    if not isinstance(settings, EvalSettings):
        raise TypeError(f"settings must be an EvalSettings, got {type(settings).__name__}")
    device = torch.device(device)
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    meter = ConfusionMeter(num_classes, ignore_index=ignore_index, device=device)
    bmeter = None if settings.boundary_tolerance is None else \
        BoundaryFMeter(num_classes, settings.boundary_tolerance, ignore_index, device)
    num_images = 0
    was_training = fn.training if isinstance(fn, torch.nn.Module) else None
    if isinstance(fn, torch.nn.Module):
        fn.eval()
    start = time.perf_counter()
    extra = None if settings.mode in EVAL_MODES else registry.eval_mode(settings.mode)
    request_ctx: Any = contextlib.nullcontext() if extra is None else extra.open(settings)
    try:
        with torch.inference_mode(), request_ctx as request:
            for batch in tqdm(loader, desc="eval", disable=not progress or rank != 0, leave=False):
                image, mask = _unpack(batch)
                image = image.to(device, non_blocking=True)
                mask = mask.to(device, non_blocking=True)
                if image.dim() != 4 or mask.dim() != 3 or image.shape[0] != mask.shape[0] \
                        or image.shape[-2:] != mask.shape[-2:]:
                    raise ValueError(f"expected image [B, 3, H, W] and mask [B, H, W] of matching B, H, W; got "
                                     f"{tuple(image.shape)} and {tuple(mask.shape)}")
                if settings.mode == "center_crop":
                    image, mask = center_crop(image, mask, settings.crop_size)
                if extra is not None:
                    probs = multiscale_logits(fn, image, (1.0,), settings.flip, "original")
                    if request.served == 0:
                        raise ValueError(f"eval.mode {extra.name!r} needs {extra.requirement}: the evaluated "
                                         "predictor does not serve it; use eval.mode=original")
                else:
                    probs = multiscale_logits(fn, image, settings.scales, settings.flip, settings.mode,
                                              settings.resolved_window, settings.resolved_stride,
                                              settings.sliding_tiles)
                pred = probs.argmax(1)
                meter.update(pred, mask)
                if bmeter is not None:
                    bmeter.update(pred, mask)
                num_images += image.shape[0]
        meter.all_reduce()
        if bmeter is not None:
            bmeter.all_reduce()
        total_images = int(all_reduce_sum(torch.tensor([num_images], dtype=torch.int64, device=device)).item())
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        if was_training is not None:
            fn.train(was_training)  # type: ignore[union-attr]
    result = meter.compute()
    if bmeter is not None:
        result.update(bmeter.compute())
    result.update(num_images=total_images, seconds=time.perf_counter() - start)
    return result
