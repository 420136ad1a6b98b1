"""Multi-scale ensembling of predictions and the multi-scale weak-to-strong loss (MaskMatch, Eqs. 7 and 8).

Scaling rule (:func:`scaled_size`, the package's one rule for a side after a scale; shared with the evaluation's
multi-scale inference and ScaleMatch): an image of ``H x W`` at scale ``s`` becomes ``int(H * s + 0.5) x
int(W * s + 0.5)`` (``rounding="half_up"``, at least 1), resized bilinearly with ``align_corners=True``; predictions
are resized back to ``H x W`` the same way (logits are resized, then turned into probabilities). ScaleMatch's
reference code resizes with ``F.interpolate(scale_factor=s)``, which floors (``rounding="floor"``: 321 x 1.5 -> 481).

- Eq. 7 (pseudo-labels): ``p = 1/S sum_k softmax(resize(f(resize(x, s_k)), H x W))``; pseudo = argmax p, conf = max p.
- Eq. 8 (student): every scale's prediction of the strong view, resized back, is supervised by the ensembled
  pseudo-label on the confident pixels. Normalisation (``norm``): the paper's per-image ``S x`` (confident pixels),
  averaged over images (``image_confident``, MaskMatch's default), or the UniMatch convention (``batch_valid``): the
  sum over scales and confident, non-ignored pixels divided by ``S x`` (non-ignored pixels of the batch).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.ops import IGNORE
from workbench.ops.losses import normalise_masked

__all__ = ["DEFAULT_SCALES", "ROUNDINGS", "check_scales", "scaled_size", "rescale", "resize_logits", "predict_scales",
           "ensemble_probs", "multiscale_ensemble", "multiscale_ce_loss"]

DEFAULT_SCALES = (0.7, 1.0, 1.5)


def check_scales(scales: Sequence[float]) -> tuple[float, ...]:
    """``scales`` as a tuple; ValueError unless a non-empty sequence of positive numbers."""
    scales = tuple(scales)
    if not scales or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive numbers, got {scales!r}")
    return scales


def _check_4d(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4 or not t.is_floating_point():
        raise ValueError(f"{name} must be a float [B, C, H, W] tensor, got {t.dtype} {tuple(t.shape)}")


ROUNDINGS = ("half_up", "floor")


def scaled_size(size: Sequence[int], scale: float, rounding: str = "half_up", min_size: int = 1) -> tuple[int, int]:
    """The size ``(H, W)`` becomes at ``scale``: per side ``int(side * scale + 0.5)`` (``rounding="half_up"``) or
    ``int(side * scale)`` (``"floor"``, what ``F.interpolate(scale_factor=scale)`` gives), at least ``min_size``."""
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"min_size must be a positive int, got {min_size!r}")
    shift = 0.5 if rounding == "half_up" else 0.0
    h, w = (int(s) for s in size)
    return max(min_size, int(h * scale + shift)), max(min_size, int(w * scale + shift))


def rescale(x: Tensor, scale: float, rounding: str = "half_up", min_size: int = 1) -> Tensor:
    """Float images, features or logits [B, C, H, W] resized to ``scaled_size((H, W), scale, rounding, min_size)``
    (bilinear, align_corners=True); returned unchanged when the size does not change."""
    _check_4d("x", x)
    size = scaled_size(x.shape[-2:], scale, rounding, min_size)
    return x if size == tuple(x.shape[-2:]) else F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def resize_logits(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Float logits [B, K, h, w] resized to ``size = (H, W)`` (bilinear, align_corners=True); unchanged if equal."""
    _check_4d("logits", logits)
    size = (int(size[0]), int(size[1]))
    if size == tuple(logits.shape[-2:]):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def predict_scales(fn: Callable[[Tensor], Tensor], x: Tensor, scales: Sequence[float] = DEFAULT_SCALES
                   ) -> list[Tensor]:
    """Predict ``x`` at every scale and resize each prediction back to ``x``'s size.

    Args:
        fn: maps float images [B, 3, h, w] to logits [B, K, h, w] at the same resolution (gradients flow if ``fn``
            keeps them).
        x: float images [B, 3, H, W].
        scales: positive scale factors.

    Returns:
        one float logits tensor [B, K, H, W] per scale, in the order of ``scales``.
    """
    _check_4d("x", x)
    size = tuple(x.shape[-2:])
    out = []
    for s in check_scales(scales):
        xs = rescale(x, s)
        logits = fn(xs)
        if logits.dim() != 4 or logits.shape[0] != x.shape[0] or logits.shape[-2:] != xs.shape[-2:]:
            raise ValueError(f"fn returned logits of shape {tuple(logits.shape)} for an input of shape "
                             f"{tuple(xs.shape)}; expected [B, K, h, w] at the input's resolution")
        out.append(resize_logits(logits, size))
    return out


def ensemble_probs(logits: Sequence[Tensor], size: Sequence[int] | None = None) -> Tensor:
    """Eq. 7: mean of ``softmax`` over predictions, each first resized to ``size``.

    Args:
        logits: float tensors [B, K, h_k, w_k] (any sizes, same B and K).
        size: ``(H, W)`` of the result; None = the first tensor's size.

    Returns:
        float32 probabilities [B, K, H, W] (sum to 1 over K).
    """
    if not logits:
        raise ValueError("logits must hold at least one prediction")
    for i, t in enumerate(logits):
        _check_4d(f"logits[{i}]", t)
        if t.shape[:2] != logits[0].shape[:2]:
            raise ValueError(f"logits[{i}] has shape {tuple(t.shape)}; B and K must match {tuple(logits[0].shape)}")
    size = tuple(logits[0].shape[-2:]) if size is None else size
    return torch.stack([resize_logits(t.float(), size).softmax(1) for t in logits]).mean(0)


@torch.no_grad()
def multiscale_ensemble(fn: Callable[[Tensor], Tensor], x: Tensor, scales: Sequence[float] = DEFAULT_SCALES
                        ) -> Tensor:
    """Eq. 7 end to end, without gradients: ``ensemble_probs(predict_scales(fn, x, scales))``.

    Returns float32 probabilities [B, K, H, W] at ``x``'s size.
    """
    return ensemble_probs(predict_scales(fn, x, scales))


def multiscale_ce_loss(logits: Sequence[Tensor], pseudo: Tensor, confident: Tensor, ignore: Tensor | None = None,
                       ignore_index: int = IGNORE, norm: str = "batch_valid") -> Tensor:
    """Eq. 8: confidence-masked CE of every scale's prediction against one (ensembled) pseudo-label.

    Args:
        logits: one float tensor [B, K, h_k, w_k] per scale; each is resized to the pseudo-label's size first.
        pseudo: long [B, H, W] pseudo-label.
        confident: bool/float [B, H, W], 1 where the pseudo-label is used (conf > tau).
        ignore: long [B, H, W] (``ignore_index`` on padding) or None.
        norm: ``"batch_valid"`` (UniMatch convention) or ``"image_confident"`` (the paper's Eq. 8: per image, over
            its confident pixels, then averaged over images); see :func:`workbench.ops.losses.normalise_masked`.

    Returns:
        scalar: ``"batch_valid"``: ``sum_k sum_pixels CE_k * confident * valid / (S * sum_pixels valid)``;
        ``"image_confident"``: ``mean_i sum_k sum_j CE_k * w_ij / (S * sum_j w_ij)`` with w = confident * valid
        (S = number of scales).
    """
    if not logits:
        raise ValueError("logits must hold at least one prediction")
    if pseudo.dim() != 3 or confident.shape != pseudo.shape or (ignore is not None and ignore.shape != pseudo.shape):
        raise ValueError(f"pseudo, confident and ignore must be [B, H, W] of one shape, got {tuple(pseudo.shape)}, "
                         f"{tuple(confident.shape)}, {None if ignore is None else tuple(ignore.shape)}")
    valid = torch.ones_like(pseudo, dtype=torch.bool) if ignore is None else ignore != ignore_index
    per_pixel = sum(F.cross_entropy(resize_logits(t, pseudo.shape[-2:]), pseudo, reduction="none") for t in logits)
    return normalise_masked(per_pixel, confident.float() * valid, valid, norm, repeats=len(logits))
