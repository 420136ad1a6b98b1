"""Loss functions shared by the methods (pure tensor functions).

Unlabeled losses follow the UniMatch convention of METHODS.md: per-pixel losses are masked by the confidence mask
and the ignore mask, summed, and divided by the number of *non-ignored* pixels (not by the confident ones).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = 255


def ce_loss(logits: Tensor, target: Tensor, ignore_index: int = IGNORE) -> Tensor:
    """Mean cross-entropy over non-ignored pixels. logits [B,K,H,W], target long [B,H,W]; 0 if all ignored.

    Computed as sum / max(count, 1) so that no branch reads the device (``F.cross_entropy``'s mean is NaN when every
    pixel is ignored)."""
    count = (target != ignore_index).sum().clamp(min=1)
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / count


def ohem_ce_loss(logits: Tensor, target: Tensor, thresh: float = 0.7, min_kept: int = 200000,
                 ignore_index: int = IGNORE) -> Tensor:
    """Online hard example mining CE (Cityscapes baseline of the reference code).

    Pixels whose probability of the ground-truth class is <= t are kept, with t = max(thresh, the min_kept-th
    smallest GT probability). When fewer than ``min_kept`` pixels are valid, every valid pixel is kept (and the loss
    is 0 without any).

    Sizes never depend on the data (no host synchronisation on a GPU): the ``min_kept``-th smallest valid
    probability is taken over all pixels with the ignored ones set to +inf (they sort last), and the choice between
    the two masks is a ``where`` on the device.
    """
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
                   ignore_index: int = IGNORE) -> Tensor:
    """Confidence-masked CE against pseudo-labels, normalised by the number of non-ignored pixels.

    logits [B,K,H,W]; pseudo long [B,H,W]; confident bool/float [B,H,W]; ignore long [B,H,W] (== ignore_index on
    padding) or None. Returns sum(CE * confident * valid) / sum(valid).
    """
    valid = torch.ones_like(pseudo, dtype=torch.bool) if ignore is None else ignore != ignore_index
    per_pixel = F.cross_entropy(logits, pseudo, reduction="none")
    w = confident.to(per_pixel.dtype) * valid
    return (per_pixel * w).sum() / valid.sum().clamp(min=1)


def masked_kl_loss(student_logits: Tensor, teacher_probs: Tensor, confident: Tensor, ignore: Tensor | None = None,
                   ignore_index: int = IGNORE) -> Tensor:
    """Confidence-masked soft loss KL(teacher || student) summed over classes, same normalisation as CE."""
    valid = torch.ones(teacher_probs.shape[0], *teacher_probs.shape[2:], dtype=torch.bool,
                       device=teacher_probs.device) if ignore is None else ignore != ignore_index
    kl = F.kl_div(student_logits.log_softmax(1), teacher_probs, reduction="none").sum(1)
    w = confident.to(kl.dtype) * valid
    return (kl * w).sum() / valid.sum().clamp(min=1)
