"""Loss functions shared by the methods (pure tensor functions).

Unlabeled losses are masked by the confidence mask and the ignore mask and then normalised in one of two ways
(``norm`` argument, :data:`NORMS`):

- ``"batch_valid"``, the UniMatch convention ("Revisiting Weak-to-Strong Consistency in Semi-Supervised Semantic
  Segmentation", CVPR 2023, and the code bases built on it): the masked per-pixel losses of the whole batch are summed
  and divided by the number of *non-ignored* pixels (not by the confident ones);
- ``"image_confident"``, MaskMatch's Eqs. 3, 6 and 8: each image's masked losses are averaged over *its* confident
  pixels, then the images are averaged (an image without a confident pixel contributes 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from workbench.ops import IGNORE

NORMS = ("batch_valid", "image_confident")


def normalise_masked(per_pixel: Tensor, weight: Tensor, valid: Tensor, norm: str = "batch_valid",
                     repeats: int = 1) -> Tensor:
    """Reduce masked per-pixel losses to a scalar under one of :data:`NORMS`.

    Args:
        per_pixel: float [B, H, W] losses, already summed over ``repeats`` predictions of the same pixels (e.g. the
            scales of MaskMatch's Eq. 8).
        weight: float/bool [B, H, W] 1 where a pixel counts (confident and not ignored).
        valid: bool [B, H, W] non-ignored pixels.
        norm: ``"batch_valid"``: sum(per_pixel * weight) / (repeats * sum(valid)); ``"image_confident"``: per image
            sum(per_pixel * weight) / (repeats * sum(weight)), averaged over the images (0 for an image whose
            weights are all 0).
        repeats: the number of predictions summed into ``per_pixel``.

    Returns:
        float 0-d tensor (nothing is read on the host).
    """
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    w = weight.to(per_pixel.dtype)
    if norm == "batch_valid":
        return (per_pixel * w).sum() / (repeats * valid.sum().clamp(min=1))
    num = (per_pixel * w).flatten(1).sum(1)
    den = w.flatten(1).sum(1)
    return (num / (repeats * den.clamp(min=1))).mean()


def ce_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE) -> Tensor:
    """Mean cross-entropy over non-ignored pixels. logits [B,K,H,W], target long [B,H,W]; 0 if all ignored.

    Computed as sum / max(count, 1) so that no branch reads the device (``F.cross_entropy``'s mean is NaN when every
    pixel is ignored)."""
    count = (target != ignore_index).sum().clamp(min=1)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / count


def ohem_min_kept_for(min_kept: int, images: int, min_kept_images: int | None) -> int:
    """The minimum kept-pixel count for a call over ``images`` images.

    ``min_kept`` counts pixels per ``min_kept_images`` images (the reference code applies its count in every process,
    to that process's images): the count becomes floor(min_kept x images / min_kept_images). ``min_kept_images``
    None applies ``min_kept`` to the call as it is. E.g. UniMatch's 200000 for 2 images per process -> 800000 for 8.
    """
    if isinstance(min_kept, bool) or not isinstance(min_kept, int) or min_kept < 0:
        raise ValueError(f"min_kept must be a non-negative integer, got {min_kept!r}")
    if min_kept_images is None:
        return min_kept
    if isinstance(min_kept_images, bool) or not isinstance(min_kept_images, int) or min_kept_images <= 0:
        raise ValueError(f"min_kept_images must be a positive integer or None, got {min_kept_images!r}")
    return min_kept * int(images) // min_kept_images


def ohem_ce_loss(logits: Tensor, target: Tensor, thresh: float = 0.7, min_kept: int = 200000,
                 ignore_index: int = IGNORE, min_kept_images: int | None = None) -> Tensor:
    """Online hard example mining CE (Cityscapes baseline of the reference code).

    Pixels whose probability of the ground-truth class is <= t are kept, with t = max(thresh, the min_kept-th
    smallest GT probability). When fewer than ``min_kept`` pixels are valid, every valid pixel is kept (and the loss
    is 0 without any). With ``min_kept_images`` set, ``min_kept`` is a count per that many images and is scaled to
    the B images of ``logits`` (:func:`ohem_min_kept_for`), as the reference applies it per process.

    Sizes never depend on the data (no host synchronisation on a GPU): the ``min_kept``-th smallest valid
    probability is taken over all pixels with the ignored ones set to +inf (they sort last), and the choice between
    the two masks is a ``where`` on the device.
    """
    min_kept = ohem_min_kept_for(min_kept, logits.shape[0], min_kept_images)
    valid = target != ignore_index
    with torch.no_grad():
        prob = logits.float().softmax(1)
        safe = torch.where(valid, target, 0)
        p_gt = prob.gather(1, safe.unsqueeze(1)).squeeze(1)
        keep = valid
        if 0 < min_kept < valid.numel():   # otherwise n_valid > min_kept cannot hold
            kth = torch.where(valid, p_gt, float("inf")).reshape(-1).kthvalue(min_kept).values
            mined = valid & (p_gt <= torch.clamp(kth, min=thresh))
            keep = torch.where(valid.sum() > min_kept, mined, valid)
    per_pixel = F.cross_entropy(logits, safe, reduction="none")
    return (per_pixel * keep).sum() / keep.sum().clamp(min=1)


def masked_ce_loss(logits: Tensor, pseudo: Tensor, confident: Tensor, ignore: Tensor | None = None,
                   ignore_index: int = IGNORE, norm: str = "batch_valid") -> Tensor:
    """Confidence-masked CE against pseudo-labels.

    logits [B,K,H,W]; pseudo long [B,H,W]; confident bool/float [B,H,W]; ignore long [B,H,W] (== ignore_index on
    padding) or None. With ``norm="batch_valid"`` returns sum(CE * confident * valid) / sum(valid); with
    ``"image_confident"`` the per-image mean over confident valid pixels, averaged over images
    (:func:`normalise_masked`).
    """
    valid = torch.ones_like(pseudo, dtype=torch.bool) if ignore is None else ignore != ignore_index
    per_pixel = F.cross_entropy(logits, pseudo, reduction="none")
    return normalise_masked(per_pixel, confident.to(per_pixel.dtype) * valid, valid, norm)


def masked_kl_loss(student_logits: Tensor, teacher_probs: Tensor, confident: Tensor, ignore: Tensor | None = None,
                   ignore_index: int = IGNORE) -> Tensor:
    """Confidence-masked soft loss KL(teacher || student) summed over classes, same normalisation as CE."""
    valid = torch.ones(teacher_probs.shape[0], *teacher_probs.shape[2:], dtype=torch.bool,
                       device=teacher_probs.device) if ignore is None else ignore != ignore_index
    kl = F.kl_div(student_logits.log_softmax(1), teacher_probs, reduction="none").sum(1)
    w = confident.to(kl.dtype) * valid
    return (kl * w).sum() / valid.sum().clamp(min=1)
