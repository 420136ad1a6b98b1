"""Supervised-only baseline: cross-entropy (or OHEM cross-entropy) on the labeled batch."""
from __future__ import annotations

from dataclasses import dataclass

from workbench.config import MethodConfig
from workbench.methods.base import Method, SemiBatch, StepInfo, StepOutput, register_method
from workbench.ops.losses import ce_loss, ohem_ce_loss


@dataclass
class SupervisedConfig(MethodConfig):
    """Supervised-only: ``loss`` is ``ce`` or ``ohem`` (keep pixels with GT prob < ohem_thresh, >= ohem_min_kept)."""

    name: str = "supervised"
    loss: str = "ce"
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 200000

    def __post_init__(self) -> None:
        if self.loss not in ("ce", "ohem"):
            from workbench.config import ConfigError
            raise ConfigError(f"method.loss: must be 'ce' or 'ohem' (got {self.loss!r})")


def supervised_loss(cfg: SupervisedConfig, logits, target):
    """The labeled loss selected by ``cfg.loss`` (shared by methods whose config extends SupervisedConfig)."""
    if cfg.loss == "ohem":
        return ohem_ce_loss(logits, target, cfg.ohem_thresh, cfg.ohem_min_kept)
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
