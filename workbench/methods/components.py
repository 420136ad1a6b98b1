"""Reusable pieces that a method switches on from its config (components, not copy-pasted code).

**LCR, local consistency regularisation** (MaskMatch, Eqs. 5-6): a patch mask ``z`` is drawn for the weak view
(``patch x patch`` patches, strategy ``random``/``block``/``grid`` of :func:`workbench.ops.masking.patch_mask`, hidden
fraction ``ratio``); hidden pixels are set to 0 *after* normalisation (the dataset's mean colour); the **student**
predicts the full segmentation of ``x_w * z`` and is supervised by the teacher's pseudo-label of the *unmasked* weak
view on the confident pixels. ``region`` picks the pixels the loss covers (MaskMatch Table 8):

- ``both``: every pixel ("LP LP", the paper's choice);
- ``unmasked``: visible pixels only ("LP /");
- ``masked``: hidden pixels only (not a row of Table 8; the complement, for ablations).

Normalisation (``norm``) is the host method's (``method.loss_norm``, :mod:`workbench.ops.losses`): under the UniMatch
convention (``batch_valid``, what the other weak-to-strong methods use) the CE summed over confident, non-ignored
pixels of the region is divided by the number of non-ignored pixels *of the region*; under MaskMatch's own
``image_confident`` (its Eq. 6) each image's CE is averaged over its confident pixels of the region, then over the
images. Table 8's image-reconstruction rows ("IR") need a reconstruction head and are not part of this component.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from workbench.ops import IGNORE
from workbench.ops.losses import masked_ce_loss
from workbench.ops.masking import patch_mask

__all__ = ["LCR_REGIONS", "lcr_region", "lcr_loss", "LCROutput", "LocalConsistency"]

LCR_REGIONS = ("both", "masked", "unmasked")


def lcr_region(visible: Tensor, region: str) -> Tensor:
    """bool [B, H, W]: the pixels the LCR loss covers, from a patch mask ``visible`` [B, 1, H, W] (1 = visible)."""
    if region not in LCR_REGIONS:
        raise ValueError(f"region must be one of {LCR_REGIONS}, got {region!r}")
    if visible.dim() != 4 or visible.shape[1] != 1:
        raise ValueError(f"visible must be [B, 1, H, W], got {tuple(visible.shape)}")
    vis = visible[:, 0] > 0.5
    return torch.ones_like(vis) if region == "both" else vis if region == "unmasked" else ~vis


def lcr_loss(logits: Tensor, pseudo: Tensor, confident: Tensor, ignore: Tensor | None, visible: Tensor,
             region: str = "both", norm: str = "batch_valid") -> Tensor:
    """The LCR loss (Eq. 6) restricted to a region.

    Args:
        logits: student logits [B, K, H, W] of the masked weak view.
        pseudo: long [B, H, W] teacher pseudo-label of the unmasked weak view.
        confident: bool [B, H, W], True where the pseudo-label is kept (conf >= tau).
        ignore: long [B, H, W] (255 on padding) or None.
        visible: float [B, 1, H, W] patch mask (1 = visible) that made the masked view.
        region: ``both``, ``unmasked`` or ``masked``.
        norm: ``batch_valid`` or ``image_confident`` (:func:`workbench.ops.losses.normalise_masked`).

    Returns:
        scalar: ``batch_valid``: sum of CE over confident, non-ignored pixels of the region / number of non-ignored
        region pixels; ``image_confident``: per image, the mean CE over its confident region pixels, averaged over
        images (0 when the region is empty).
    """
    covered = lcr_region(visible, region)
    if covered.shape != pseudo.shape:
        raise ValueError(f"visible {tuple(visible.shape)} does not match pseudo {tuple(pseudo.shape)}")
    outside = torch.full_like(pseudo, IGNORE)
    base = torch.zeros_like(pseudo) if ignore is None else ignore
    return masked_ce_loss(logits, pseudo, confident, torch.where(covered, base, outside), norm=norm)


@dataclass
class LCROutput:
    """One LCR evaluation: the unweighted ``loss`` and, for capture, the masked input [B,3,H,W], the patch mask
    ``visible`` [B,1,H,W], the loss ``region`` bool [B,H,W] and the student's ``logits`` [B,K,H,W] on the masked
    view."""

    loss: Tensor
    x_masked: Tensor
    visible: Tensor
    region: Tensor
    logits: Tensor

    def artifacts(self) -> dict[str, Tensor]:
        """Capture tensors: ``x_masked`` (image), ``lcr_visible``/``lcr_region`` (bool [B,H,W]), ``pred_masked``."""
        return {"x_masked": self.x_masked, "lcr_visible": self.visible[:, 0] > 0.5, "lcr_region": self.region,
                "pred_masked": self.logits.argmax(1)}


@dataclass
class LocalConsistency:
    """The LCR component: mask the weak view, let the student predict it, CE against the weak view's targets.

    Built from a method config (:meth:`from_config`); the settings and their defaults are declared once, on the
    config (``lcr_*`` fields of :class:`~workbench.methods.fixmatch.FixMatchConfig`).

    Attributes:
        weight: loss weight (lambda2 in MaskMatch; 0 = off).
        patch: patch side in pixels (paper: 32 at 513/769 crops).
        ratio: hidden fraction gamma (paper: 0.7).
        strategy: ``random`` (paper), ``block`` or ``grid`` (Table 9).
        region: ``both`` (paper), ``unmasked`` or ``masked`` (Table 8).
        norm: the loss normalisation, the host method's ``loss_norm`` (``image_confident`` in MaskMatch, Eq. 6).
    """

    weight: float
    patch: int
    ratio: float
    strategy: str
    region: str
    norm: str

    @classmethod
    def from_config(cls, cfg: Any) -> LocalConsistency:
        """Build from a method config with ``lcr_weight``, ``lcr_patch``, ``lcr_ratio``, ``lcr_strategy``,
        ``lcr_region`` and ``loss_norm`` fields (every FixMatchConfig has them)."""
        return cls(cfg.lcr_weight, cfg.lcr_patch, cfg.lcr_ratio, cfg.lcr_strategy, cfg.lcr_region, cfg.loss_norm)

    @property
    def enabled(self) -> bool:
        """True when the weight is positive."""
        return self.weight > 0

    def mask(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(x * z, z): the masked images [B,3,H,W] (hidden pixels = 0) and the patch mask z [B,1,H,W] (1 = visible).

        The mask is drawn from torch's global RNG on ``x``'s device.
        """
        b, _, h, w = x.shape
        visible = patch_mask(b, h, w, self.patch, self.ratio, self.strategy, device=x.device).to(x.dtype)
        return x * visible, visible

    def __call__(self, student: nn.Module, x_w: Tensor, pseudo: Tensor, confident: Tensor,
                 ignore: Tensor | None) -> LCROutput:
        """Run LCR for one batch.

        Args:
            student: the network trained by this loss (returns a dict with "logits").
            x_w: normalised weak views [B,3,H,W] (unmasked).
            pseudo, confident, ignore: the teacher's targets for ``x_w`` ([B,H,W]; ignore may be None).

        Returns:
            :class:`LCROutput` with the unweighted loss.
        """
        x_masked, visible = self.mask(x_w)
        logits = student(x_masked)["logits"]
        loss = lcr_loss(logits, pseudo, confident, ignore, visible, self.region, self.norm)
        return LCROutput(loss, x_masked, visible, lcr_region(visible, self.region), logits)
