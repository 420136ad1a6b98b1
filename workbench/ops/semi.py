"""Weak-to-strong building blocks (pure tensor functions): pseudo-labels, CutMix pasting, diagnostics."""
from __future__ import annotations

import torch
from torch import Tensor

from workbench.ops import IGNORE


def pseudo_label(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(pseudo = argmax_c p, conf = max_c p) of softmax(logits) [B,K,H,W], computed in fp32 without gradients."""
    with torch.no_grad():
        conf, pseudo = logits.detach().float().softmax(1).max(1)
    return pseudo, conf


def cutmix_images(x: Tensor, x_mix: Tensor, box: Tensor) -> Tensor:
    """Images [B,3,H,W] with the pixels inside ``box`` (bool [B,H,W]) taken from ``x_mix`` (a new tensor)."""
    if box.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"box shape {tuple(box.shape)} does not match images {tuple(x.shape)}")
    return torch.where(box.unsqueeze(1), x_mix, x)


def paste_in_box(box: Tensor, *pairs: tuple[Tensor, Tensor]) -> list[Tensor]:
    """For each (value, value_mix) [B,H,W] pair, ``value`` with the pixels inside ``box`` taken from ``value_mix``.

    Used for the pseudo-label, the confidence and the ignore mask of a CutMixed strong view (UniMatch convention:
    inside the box they come from the teacher's prediction on the mix batch).
    """
    out = []
    for value, value_mix in pairs:
        if value.shape != box.shape or value_mix.shape != box.shape:
            raise ValueError(f"shapes {tuple(value.shape)}/{tuple(value_mix.shape)} do not match box "
                             f"{tuple(box.shape)}")
        out.append(torch.where(box, value_mix, value))
    return out


def confident_mask(conf: Tensor, tau: float, ignore: Tensor | None = None, strict: bool = False) -> Tensor:
    """bool [B,H,W]: conf >= tau (conf > tau when ``strict``) and not ignored (ignore == 255 marks padding)."""
    mask = conf > tau if strict else conf >= tau
    if ignore is not None:
        mask &= ignore != IGNORE
    return mask


@torch.no_grad()
def pseudo_label_diagnostics(pseudo: Tensor, confident: Tensor, ignore: Tensor | None, gt: Tensor | None,
                             num_classes: int) -> dict[str, Tensor]:
    """Quality of pseudo-labels (scalar tensors; nothing is synchronised with the host).

    ``mask_ratio`` = confident / valid pixels (valid = not padding). With the ground truth ``gt`` (diagnostics only,
    never a loss), over pixels that are valid and not ignored in the GT:
      - ``pl_acc``: accuracy of the confident pseudo-labels;
      - ``pl_miou``: mIoU of all pseudo-labels against the GT (classes absent from both are skipped);
      - ``mining_ratio``: confident-and-correct / all correct pixels (CorrMatch Fig. 5b);
      - ``effective_ratio``: confident-and-correct / all pixels (CorrMatch Fig. 5c).
    """
    valid = torch.ones_like(pseudo, dtype=torch.bool) if ignore is None else ignore != IGNORE
    out = {"mask_ratio": (confident & valid).sum() / valid.sum().clamp(min=1)}
    if gt is None:
        return out
    v = valid & (gt != IGNORE)
    correct = (pseudo == gt) & v
    conf_v = confident & v
    out["pl_acc"] = (correct & conf_v).sum() / conf_v.sum().clamp(min=1)
    out["mining_ratio"] = (correct & conf_v).sum() / correct.sum().clamp(min=1)
    out["effective_ratio"] = (correct & conf_v).sum() / v.sum().clamp(min=1)
    k = num_classes
    # the confusion matrix by index_add over every pixel (others add 0 to bin 0): fixed sizes, no host read
    cells = torch.where(v, gt * k + pseudo, 0).reshape(-1)
    cm = torch.zeros(k * k, dtype=torch.long, device=pseudo.device).index_add_(0, cells, v.reshape(-1).long())
    cm = cm.view(k, k).float()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    present = union > 0
    out["pl_miou"] = torch.where(present, inter / union.clamp(min=1), 0.0).sum() / present.sum().clamp(min=1)
    return out


def class_quality(pseudo: Tensor, confident: Tensor, gt: Tensor, num_classes: int,
                  valid: Tensor | None = None) -> dict[str, Tensor]:
    """Per-class quality of pseudo-labels against the ground truth (diagnostics only): the package's one
    implementation, behind the analyses (:func:`workbench.runs.capture_quality`) and the dashboard.

    Args: ``pseudo`` and ``gt`` integer label maps [...] (gt 255 = ignore), ``confident`` bool [...] (passes the
    threshold), ``valid`` bool [...] (False = padding; default all valid). Counted over pixels that are valid and
    not ignored in ``gt``. Returns float64 tensors [num_classes] (NaN where the ratio is 0/0):

    - ``gt_pixels``: number of pixels of class c;
    - ``iou``: |P=c and G=c| / |P=c or G=c| of all pseudo-labels;
    - ``precision``: share of confident pixels pseudo-labelled c that are c (class-wise ``pl_acc``);
    - ``mask_ratio``: share of class-c pixels that are confident (how much of the class is trained on);
    - ``mining_ratio``: share of correctly pseudo-labelled class-c pixels that are confident.
    """
    if pseudo.shape != gt.shape or confident.shape != gt.shape:
        raise ValueError(f"pseudo {tuple(pseudo.shape)}, confident {tuple(confident.shape)} and gt "
                         f"{tuple(gt.shape)} must have the same shape")
    if confident.dtype != torch.bool:
        raise TypeError(f"confident must be a bool tensor, got {confident.dtype}")
    if valid is not None and (valid.shape != gt.shape or valid.dtype != torch.bool):
        raise ValueError(f"valid must be a bool tensor of shape {tuple(gt.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    g, p = gt.long().flatten(), pseudo.long().flatten()
    keep = g != IGNORE
    if valid is not None:
        keep &= valid.flatten()
    g, p, c = g[keep], p[keep], confident.flatten()[keep]
    if g.numel() and (int(g.max()) >= num_classes or int(p.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}) or be 255 in gt")
    k = num_classes
    count = lambda sel, lab: torch.bincount(lab[sel], minlength=k).double()
    allv = torch.ones_like(g, dtype=torch.bool)
    right = p == g
    gt_n, pred_n, inter = count(allv, g), count(allv, p), count(right, g)
    conf_pred, conf_right, conf_gt = count(c, p), count(c & right, g), count(c, g)
    return {"gt_pixels": gt_n, "iou": inter / (gt_n + pred_n - inter), "precision": conf_right / conf_pred,
            "mask_ratio": conf_gt / gt_n, "mining_ratio": conf_right / inter}
