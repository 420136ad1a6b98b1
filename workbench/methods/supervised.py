"""Supervised-only baseline: cross-entropy (or OHEM cross-entropy) on the labeled batch."""
from __future__ import annotations

from dataclasses import dataclass

from workbench.config import MethodConfig
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
    loss: str = "ce"
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 200000
    """Minimum pixels OHEM keeps per ``ohem_min_kept_images`` labeled images (the reference config's ``min_kept``)."""
    ohem_min_kept_images: int | None = 2
    """Labeled images per process that ``ohem_min_kept`` was set for (UniMatch/CorrMatch Cityscapes: 2);
    null = apply ``ohem_min_kept`` to every loss call unscaled (switch, off by default)."""

    def __post_init__(self) -> None:
        self.check([
            (self.loss in ("ce", "ohem"), "loss", "must be 'ce' or 'ohem'"),
            (0.0 < self.ohem_thresh <= 1.0, "ohem_thresh", "must be in (0, 1]"),
            (self.ohem_min_kept >= 0, "ohem_min_kept", "must be >= 0"),
            (self.ohem_min_kept_images is None or self.ohem_min_kept_images > 0, "ohem_min_kept_images",
             "must be a positive number of images per process, or null (no scaling)"),
        ])


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
