"""Supervised-only baseline: cross-entropy (or OHEM cross-entropy) on the labeled batch."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from workbench.config import MethodConfig, bounded
from workbench.methods.base import Method, SemiBatch, StepInfo, StepOutput, register_method
from workbench.ops.losses import ce_loss, ohem_ce_loss


@dataclass
class SupervisedConfig(MethodConfig):
    """Supervised-only: ``loss`` is ``ce`` or ``ohem`` (keep pixels with GT prob < ohem_thresh, >= ohem_min_kept).

    OHEM's minimum kept-pixel count, as the reference code applies it: UniMatch/CorrMatch compute the OHEM loss in
    every process over that process's labeled images (2 per GPU x 4 GPUs on Cityscapes), so their ``min_kept``
    (UniMatch 200000, CorrMatch 100000) is a count per 2 images. ``ohem_min_kept`` states the reference number and
    ``ohem_min_kept_images`` the images per process it was set for; each loss call scales it to its own labeled
    images (floor(ohem_min_kept x B / ohem_min_kept_images): 800000 for UniMatch's count on 8 images in one
    process), so one process with batch 8 keeps as many pixels per image as the reference. Switch:
    ``ohem_min_kept_images: null`` applies ``ohem_min_kept`` unscaled to every call (with 8 images in one process
    that keeps 4x fewer pixels per image than the reference).
    """

    name: str = "supervised"
    loss: Literal["ce", "ohem"] = "ce"
    ohem_thresh: float = bounded(0.7, gt=0, le=1)
    ohem_min_kept: int = bounded(200000, ge=0)
    """Minimum pixels OHEM keeps per ``ohem_min_kept_images`` labeled images (the reference config's ``min_kept``)."""
    ohem_min_kept_images: int | None = bounded(2, gt=0)
    """Labeled images per process that ``ohem_min_kept`` was set for (UniMatch/CorrMatch Cityscapes: 2);
    null = apply ``ohem_min_kept`` to every loss call unscaled (switch, off by default)."""


def supervised_loss(cfg: SupervisedConfig, logits, target):
    """The labeled loss selected by ``cfg.loss`` (shared by methods whose config extends SupervisedConfig)."""
    if cfg.loss == "ohem":
        return ohem_ce_loss(logits, target, cfg.ohem_thresh, cfg.ohem_min_kept,
                            min_kept_images=cfg.ohem_min_kept_images)
    return ce_loss(logits, target)


@register_method
class Supervised(Method):
    """Train on labeled images only."""

    name = "supervised"
    config_class = SupervisedConfig
    uses_unlabeled = False

    def training_step(self, batch: SemiBatch, step: StepInfo) -> StepOutput:
        out = self.model(batch.x_l)
        loss = supervised_loss(self.cfg, out["logits"], batch.y_l)
        arts = {}
        if step.capture:
            arts = {"x_l": batch.x_l, "y_l": batch.y_l, "pred_l": out["logits"].argmax(1)}
        return StepOutput(loss, {"loss_x": loss.detach()}, arts)
