"""Segmentation metrics built on one confusion matrix (rows = ground truth, columns = prediction).

Everything here works on any device; the matrix is int64 so that counts over a whole validation set never overflow.
The foreground diagnostics (``foreground_stats``) separate "finds objects" from "tells the classes apart", which a
single mIoU number hides (a model can find objects yet barely tell their classes apart).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from workbench.ops.collective import all_reduce_sum

__all__ = [
    "confusion_matrix",
    "class_iou",
    "mean_iou",
    "pixel_accuracy",
    "foreground_stats",
    "all_reduce_sum",
    "ConfusionMeter",
    "boundary_map",
    "boundary_radius",
    "boundary_prf",
    "boundary_f_score",
    "BoundaryFMeter",
]


def _check_cm(cm: torch.Tensor) -> torch.Tensor:
    """Validate a square confusion matrix and return it as float64 for ratio arithmetic."""
    if not isinstance(cm, torch.Tensor):
        raise TypeError(f"cm must be a torch.Tensor, got {type(cm).__name__}")
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square [K, K] matrix, got shape {tuple(cm.shape)}")
    return cm.to(torch.float64)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> float:
    """num / den as a Python float, NaN when den is zero."""
    return float(num / den) if float(den) > 0 else math.nan


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int | None = 255) -> torch.Tensor:
    """Count (ground truth, prediction) pairs.

    Args:
        pred: integer class ids, any shape (e.g. [B, H, W]), values in [0, num_classes).
        target: integer class ids of the same shape; pixels equal to ``ignore_index`` are skipped.
        num_classes: K, the number of classes.
        ignore_index: label value to skip, or None to count every pixel.

    Returns:
        int64 tensor [K, K] on ``pred``'s device; entry [g, p] counts pixels with ground truth g predicted as p.

    Raises:
        TypeError: non-tensor or non-integer inputs.
        ValueError: shape mismatch, or a target (other than the ignore index) or prediction outside [0, K).
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    target = target.to(pred.device).reshape(-1).long()
    pred = pred.reshape(-1).long()
    if ignore_index is not None:
        keep = target != ignore_index
        target, pred = target[keep], pred[keep]
    for name, t in (("target", target), ("pred", pred)):
        if t.numel() and (bool((t < 0).any()) or bool((t >= num_classes).any())):
            bad = t[(t < 0) | (t >= num_classes)].unique()[:5].tolist()
            raise ValueError(f"{name} has values {bad} outside [0, {num_classes}) "
                             f"(ignore_index={ignore_index})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def class_iou(cm: torch.Tensor) -> torch.Tensor:
    """Per-class intersection over union TP / (TP + FP + FN).

    Args:
        cm: confusion matrix [K, K] (rows = ground truth, columns = prediction), any numeric dtype.

    Returns:
        float64 tensor [K]; NaN for a class absent from both ground truth and prediction.
    """
    m = _check_cm(cm)
    tp = m.diagonal()
    union = m.sum(0) + m.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))


def mean_iou(cm: torch.Tensor) -> float:
    """Mean of ``class_iou`` over the classes that occur (NaNs skipped); NaN when no class occurs at all."""
    iou = class_iou(cm)
    present = ~torch.isnan(iou)
    return float(iou[present].mean()) if bool(present.any()) else math.nan


def pixel_accuracy(cm: torch.Tensor) -> float:
    """Fraction of counted pixels predicted correctly (trace / total); NaN for an empty matrix."""
    m = _check_cm(cm)
    return _ratio(m.trace(), m.sum())


def foreground_stats(cm: torch.Tensor, background: int = 0) -> dict[str, float]:
    """Foreground diagnostics: does the model find objects, and does it name them right?

    Args:
        cm: confusion matrix [K, K] (rows = ground truth, columns = prediction).
        background: index of the background class; every other class counts as foreground.

    Returns:
        dict of floats (NaN when undefined):
        - "fg_iou": IoU of the binary foreground-vs-background problem (all foreground classes merged).
        - "fg_class_acc": among pixels that are foreground in ground truth AND predicted as some foreground class,
          the fraction predicted with the right class (chance is 1 / number of foreground classes).
        - "fg_gt_frac", "fg_pred_frac": fraction of counted pixels that are foreground in ground truth / prediction
          (an under-predicting teacher shows fg_pred_frac < fg_gt_frac).
    """
    m = _check_cm(cm)
    k = m.shape[0]
    if not isinstance(background, int) or not 0 <= background < k:
        raise ValueError(f"background must be a class index in [0, {k}), got {background!r}")
    fg = torch.ones(k, dtype=torch.bool, device=m.device)
    fg[background] = False
    both_fg = m[fg][:, fg]
    inter = both_fg.sum()
    missed = m[fg, background].sum()        # GT foreground predicted as background
    false_alarm = m[background, fg].sum()   # GT background predicted as foreground
    total = m.sum()
    return {
        "fg_iou": _ratio(inter, inter + missed + false_alarm),
        "fg_class_acc": _ratio(both_fg.diagonal().sum(), inter),
        "fg_gt_frac": _ratio(m[fg].sum(), total),
        "fg_pred_frac": _ratio(m[:, fg].sum(), total),
    }


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else x


class ConfusionMeter:
    """Accumulates a confusion matrix over batches (and processes) and reports every metric of this module.

    Usage: ``update`` per batch, ``all_reduce`` once after the last batch (a no-op without torch.distributed),
    ``compute`` for a JSON-ready dict, ``reset`` to start over.

    Args:
        num_classes: K.
        ignore_index: target value that is skipped (None: count every pixel).
        device: where the matrix lives; None = the device of the first ``update``'s prediction (CPU if none).
        background: background class for the foreground diagnostics.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255,
                 device: torch.device | str | None = None, background: int = 0) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(background, int) or not 0 <= background < num_classes:
            raise ValueError(f"background must be a class index in [0, {num_classes}), got {background!r}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.device = torch.device(device) if device is not None else None
        self.background = background
        self.reset()

    def reset(self) -> None:
        """Zero the matrix and allow updates again."""
        self._cm: torch.Tensor | None = None
        self._reduced = False

    @property
    def matrix(self) -> torch.Tensor:
        """The accumulated int64 [K, K] confusion matrix (rows = ground truth, columns = prediction)."""
        if self._cm is None:
            k = self.num_classes
            self._cm = torch.zeros(k, k, dtype=torch.int64, device=self.device or torch.device("cpu"))
        return self._cm

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch.

        Args:
            pred: integer class ids with ``target``'s shape, or floating scores [B, K, H, W] for target [B, H, W]
                (argmax over dim 1 is taken).
            target: integer ground truth, e.g. [B, H, W]; ``ignore_index`` pixels are skipped.
        """
        if self._reduced:
            raise RuntimeError("ConfusionMeter was already all-reduced; call reset() before new updates")
        if isinstance(pred, torch.Tensor) and pred.dtype.is_floating_point and \
                isinstance(target, torch.Tensor) and pred.dim() == target.dim() + 1:
            if pred.shape[1] != self.num_classes:
                raise ValueError(f"pred scores have {pred.shape[1]} channels, expected {self.num_classes}")
            pred = pred.argmax(1)
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        if self._cm is None and self.device is None:
            self._cm = torch.zeros_like(cm)
        self.matrix.add_(cm.to(self.matrix.device))

    def all_reduce(self) -> None:
        """Sum the matrix across processes (torch.distributed, when initialised). Call once, after all updates."""
        if self._reduced:
            raise RuntimeError("ConfusionMeter.all_reduce() called twice; it would count every pixel again")
        self._cm = all_reduce_sum(self.matrix)
        self._reduced = True

    def compute(self) -> dict[str, Any]:
        """Metrics of the accumulated matrix, JSON-ready (plain Python types, every NaN replaced by None).

        Returns:
            dict with "miou" (float), "iou" (list of K floats), "pixel_acc", "fg_iou", "fg_class_acc",
            "fg_gt_frac", "fg_pred_frac" (floats) and "confusion" (K x K nested list of ints).
        """
        cm = self.matrix
        out: dict[str, Any] = {
            "miou": _none_if_nan(mean_iou(cm)),
            "iou": [_none_if_nan(v) for v in class_iou(cm).tolist()],
            "pixel_acc": _none_if_nan(pixel_accuracy(cm)),
        }
        out.update({k: _none_if_nan(v) for k, v in foreground_stats(cm, self.background).items()})
        out["confusion"] = cm.cpu().tolist()
        return out


# ---------------------------------------------------------------- boundary F-score
# DAVIS-style boundary measure (Perazzi et al. 2016, after Martin et al.'s BSDS benchmark), as MaskMatch reports it
# on Cityscapes with a tolerance of 0.0003 of the image diagonal. Per image and class: the boundary pixels of the
# predicted and of the ground-truth class mask are matched within a distance of r pixels,
# r = ceil(tolerance * diagonal) (DAVIS's rule: any positive tolerance means at least 1 pixel; 0 means the same pixel).
# Ignored ground-truth pixels count as "not this class" in both masks (the convention of the Cityscapes boundary
# evaluations that follow DAVIS). DAVIS's empty cases: no predicted boundary -> precision 1; no ground-truth
# boundary -> recall 1; F = 0 when precision + recall = 0. An (image, class) pair with no boundary pixel in either
# mask carries no boundary information and is skipped (DAVIS-style code scores it F = 1, which inflates the mean with
# every absent class). A class's F is the mean over the images where it counts; the score is the mean over classes.


def boundary_map(mask: torch.Tensor) -> torch.Tensor:
    """Boundary pixels of binary masks.

    A pixel is a boundary pixel when its value differs from its right, lower or lower-right neighbour (neighbours
    outside the image are not compared, so the image border itself is no boundary). This marks one pixel per
    transition, the same convention as DAVIS/BSDS.

    Args:
        mask: bool (or 0/1 integer) tensor [..., H, W].

    Returns:
        bool tensor [..., H, W].
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() < 2:
        raise ValueError(f"mask must be [..., H, W], got shape {tuple(mask.shape)}")
    m = mask.bool()
    b = torch.zeros_like(m)
    b[..., :, :-1] |= m[..., :, :-1] != m[..., :, 1:]
    b[..., :-1, :] |= m[..., :-1, :] != m[..., 1:, :]
    b[..., :-1, :-1] |= m[..., :-1, :-1] != m[..., 1:, 1:]
    return b


def boundary_radius(tolerance: float, height: int, width: int) -> int:
    """Matching distance in pixels: ``ceil(tolerance * sqrt(height^2 + width^2))``; ``tolerance`` in [0, 1)."""
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        raise ValueError(f"tolerance must be a fraction of the image diagonal in [0, 1), got {tolerance!r}")
    return math.ceil(tolerance * math.hypot(height, width))


def _dilate(b: torch.Tensor, radius: int) -> torch.Tensor:
    """bool [N, H, W] dilated by a disk of ``radius`` pixels (offsets with dy^2 + dx^2 <= radius^2)."""
    if radius == 0:
        return b
    r = torch.arange(-radius, radius + 1, device=b.device)
    disk = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius ** 2).float()[None, None]
    return F.conv2d(b.float()[:, None], disk, padding=radius)[:, 0] > 0.5


def _check_labels(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    for name, t in (("pred", pred), ("gt", gt)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer class ids, got dtype {t.dtype}")
    if pred.shape != gt.shape or pred.dim() not in (2, 3):
        raise ValueError(f"pred and gt must both be [H, W] or [B, H, W] of one shape, got {tuple(pred.shape)} and "
                         f"{tuple(gt.shape)}")
    if pred.dim() == 2:
        pred, gt = pred[None], gt[None]
    return pred, gt.to(pred.device)


def boundary_prf(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, tolerance: float = 0.0003,
                 ignore_index: int | None = 255) -> dict[str, torch.Tensor]:
    """Boundary precision, recall and F per image and class (see the section comment above for the definition).

    Args:
        pred: integer class ids [B, H, W] (or [H, W]).
        gt: integer ground truth of the same shape; ``ignore_index`` pixels count as no class in both masks.
        num_classes: K.
        tolerance: matching distance as a fraction of the image diagonal, in [0, 1).
        ignore_index: ground-truth value to ignore, or None.

    Returns:
        dict of [B, K] tensors: "precision", "recall", "f" (float64) and "counted" (bool: the class has boundary
        pixels in the prediction or the ground truth of that image; the other entries are NaN).
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    pred, gt = _check_labels(pred, gt)
    radius = boundary_radius(tolerance, gt.shape[-2], gt.shape[-1])
    valid = torch.ones_like(gt, dtype=torch.bool) if ignore_index is None else gt != ignore_index
    shape = (gt.shape[0], num_classes)
    out = {k: torch.full(shape, math.nan, dtype=torch.float64, device=pred.device)
           for k in ("precision", "recall", "f")}
    out["counted"] = torch.zeros(shape, dtype=torch.bool, device=pred.device)
    for c in range(num_classes):
        bp, bg = boundary_map((pred == c) & valid), boundary_map((gt == c) & valid)
        n_p, n_g = bp.sum((1, 2)).double(), bg.sum((1, 2)).double()
        counted = (n_p > 0) | (n_g > 0)
        if not bool(counted.any()):
            continue
        hit_p = (bp & _dilate(bg, radius)).sum((1, 2)).double()
        hit_g = (bg & _dilate(bp, radius)).sum((1, 2)).double()
        p = torch.where(n_p > 0, hit_p / n_p.clamp(min=1), torch.ones_like(n_p))
        r = torch.where(n_g > 0, hit_g / n_g.clamp(min=1), torch.ones_like(n_g))
        f = torch.where(p + r > 0, 2 * p * r / (p + r).clamp(min=1e-12), torch.zeros_like(p))
        nan = torch.full_like(p, math.nan)
        out["precision"][:, c] = torch.where(counted, p, nan)
        out["recall"][:, c] = torch.where(counted, r, nan)
        out["f"][:, c] = torch.where(counted, f, nan)
        out["counted"][:, c] = counted
    return out


class BoundaryFMeter:
    """Accumulates the boundary F-score over an evaluation (and over processes).

    Per class it sums precision, recall and F over the (image, class) pairs that count (see ``boundary_prf``), so
    ``compute`` returns the per-class means and their mean over the classes that counted at least once.
    Usage like :class:`ConfusionMeter`: ``update`` per batch, ``all_reduce`` once, ``compute``, ``reset``.

    Args:
        num_classes: K.
        tolerance: matching distance as a fraction of the image diagonal (MaskMatch: 0.0003).
        ignore_index: ground-truth value to ignore (None: none).
        device: where the sums live (None: the first update's device).
    """

    def __init__(self, num_classes: int, tolerance: float = 0.0003, ignore_index: int | None = 255,
                 device: torch.device | str | None = None) -> None:
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        boundary_radius(tolerance, 1, 1)  # validates the tolerance
        self.num_classes = num_classes
        self.tolerance = tolerance
        self.ignore_index = ignore_index
        self.device = torch.device(device) if device is not None else None
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        self._sums: torch.Tensor | None = None   # float64 [4, K]: precision, recall, F sums and counts
        self._reduced = False

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` integer ids like ``target`` [B, H, W], or float scores [B, K, H, W] (argmax taken)."""
        if self._reduced:
            raise RuntimeError("BoundaryFMeter was already all-reduced; call reset() before new updates")
        if isinstance(pred, torch.Tensor) and pred.dtype.is_floating_point and \
                isinstance(target, torch.Tensor) and pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        res = boundary_prf(pred, target, self.num_classes, self.tolerance, self.ignore_index)
        sums = torch.stack([res[k].nan_to_num(0.0).sum(0) for k in ("precision", "recall", "f")]
                           + [res["counted"].sum(0).double()])
        if self._sums is None:
            self._sums = torch.zeros_like(sums, device=self.device or sums.device)
        self._sums += sums.to(self._sums.device)

    def all_reduce(self) -> None:
        """Sum over processes (torch.distributed, when initialised). Call once, after all updates."""
        if self._reduced:
            raise RuntimeError("BoundaryFMeter.all_reduce() called twice; it would count every image again")
        if self._sums is None:
            self._sums = torch.zeros(4, self.num_classes, dtype=torch.float64, device=self.device or "cpu")
        self._sums = all_reduce_sum(self._sums)
        self._reduced = True

    def compute(self) -> dict[str, Any]:
        """JSON-ready results (None where undefined).

        Returns:
            dict with "boundary_f" (mean over classes of the per-class mean F), "boundary_precision",
            "boundary_recall" (same averaging) and "boundary_f_per_class" (list of K floats or None).
        """
        sums = self._sums if self._sums is not None else torch.zeros(4, self.num_classes, dtype=torch.float64)
        counts = sums[3]
        seen = counts > 0
        per_class = torch.where(seen, sums[:3] / counts.clamp(min=1), torch.full_like(sums[:3], math.nan))

        def mean(row: torch.Tensor) -> float | None:
            return float(row[seen].mean()) if bool(seen.any()) else None

        return {"boundary_f": mean(per_class[2]), "boundary_precision": mean(per_class[0]),
                "boundary_recall": mean(per_class[1]),
                "boundary_f_per_class": [_none_if_nan(v) for v in per_class[2].tolist()]}


def boundary_f_score(pred: torch.Tensor, gt: torch.Tensor, num_classes: int, tolerance: float = 0.0003,
                     ignore_index: int | None = 255) -> float:
    """Boundary F-score of a batch: per-class mean F over the images where the class counts, averaged over classes.

    Args:
        pred: integer class ids [B, H, W] (or [H, W]).
        gt: integer ground truth of the same shape (``ignore_index`` pixels count as no class).
        num_classes: K.
        tolerance: matching distance as a fraction of the image diagonal, in [0, 1); the radius in pixels is
            ``ceil(tolerance * diagonal)`` (0 = exact pixel match, any positive value = at least 1 pixel).
        ignore_index: ground-truth value to ignore, or None.

    Returns:
        float in [0, 1]; NaN when no class has a boundary in the prediction or the ground truth.
    """
    meter = BoundaryFMeter(num_classes, tolerance, ignore_index)
    meter.update(pred, gt)
    score = meter.compute()["boundary_f"]
    return math.nan if score is None else score
